"""Compiled (numba) kernel of client-side training: Eq. 13-15 on ego graphs, one user per task.

Why a compiled loop: a user's SGD touches only its own positives, its sampled negatives and its
embedding (a few hundred rows), so one user's whole local training fits in cache. Written as
tensor operations over every pair of a cohort, each step is some 35 passes over memory; written
as a loop over one user's pairs it is one pass. Users' parameters are disjoint, so ranges of
users run on ``torch.get_num_threads()`` Python threads (the kernels release the GIL), the same
budget as torch. Plain threads rather than numba's ``parallel=True``: the kernels compile in
half the time, and no second threading runtime (OpenMP, TBB or numba's workqueue, which aborts
when two threads enter it) runs beside torch's and Ray's. numba compiles once per checkout
(``cache=True``; ``make`` warms the cache when it installs, :mod:`fedshare.kernels`).

Everything a user's result depends on (its rows, its negatives, its step order) is computed
from that user alone, so a user trains bit for bit alike alone or in any cohort. Negatives
re-implement :func:`fedshare.sampling.sample_negatives`'s SplitMix64 stream exactly (a test
compares the two).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

from fedshare.sampling_kernel import hash5

MINIBATCH_KEY = 1 << 40
"""Last key of the mini-batch shuffling stream (``counter_uniform(seed, round, user, slot,
MINIBATCH_KEY)``), distinct from every negative-sampling attempt number."""
_EXACT = {"nnan", "ninf", "nsz", "arcp", "afn"}
"""fastmath without ``reassoc`` or ``contract``: LLVM vectorises a loop behind a run-time check
that its arrays do not overlap and runs a scalar copy otherwise; a reassociated sum, or a
multiply-add fused in one copy only, would then make a user's floats depend on where its rows
lie in memory."""
RANGES_PER_THREAD = 4
"""Users are cut into this many ranges of about equal work per thread (sizes vary 100x)."""


@njit(cache=True, nogil=True)
def _draw_negatives(user: int, count: int, stamp: int, known: np.ndarray, num_items: int,
                    seed: int, round_: int, max_attempts: int, out: np.ndarray) -> bool:
    """``out[slot]`` = the negative of ``slot`` (``slot = i k E + e k + j``): the first
    attempt's item with ``known[item] != stamp``; False if ``max_attempts`` found none."""
    s, r, u = np.uint64(seed), np.uint64(round_), np.uint64(user)
    items = np.uint64(num_items)
    for slot in range(count):
        found = False
        for attempt in range(max_attempts):
            cand = np.int64(hash5(s, r, u, np.uint64(slot), np.uint64(attempt)) % items)
            if known[cand] != stamp:
                out[slot] = cand
                found = True
                break
        if not found:
            return False
    return True


@njit(cache=True, nogil=True)
def sample_rows(first: int, last: int, users: np.ndarray, indptr: np.ndarray,
                items: np.ndarray, known_lo: np.ndarray, known_hi: np.ndarray,
                known_items: np.ndarray, num_items: int, k: int, epochs: int, seed: int,
                round_: int, max_attempts: int, negatives: np.ndarray, row_items: np.ndarray,
                row_count: np.ndarray) -> bool:
    """Pass 1 for users ``first:last``: their negatives and private rows (sorted unique
    positives and negatives). User ``b`` knows ``known_items[known_lo[b]:known_hi[b]]``;
    ``negatives`` holds ``k E`` slots per positive at ``indptr * k E``; ``row_items`` up to
    ``1 + k E`` rows per positive at ``indptr * (1 + k E)``."""
    per = k * epochs
    known = np.zeros(num_items, np.int64)  # == b + 1: known to user b
    taken = np.zeros(num_items, np.int64)  # == b + 1: already one of user b's rows
    for b in range(first, last):
        lo, hi = indptr[b], indptr[b + 1]
        if hi == lo:
            row_count[b] = 0
            continue
        stamp = b + 1
        known[known_items[known_lo[b]:known_hi[b]]] = stamp
        neg = negatives[lo * per: hi * per]
        if not _draw_negatives(users[b], len(neg), stamp, known, num_items, seed, round_,
                               max_attempts, neg):
            return False
        out = row_items[lo * (1 + per): hi * (1 + per)]
        count = 0
        for source in (items[lo:hi], neg):
            for item in source:
                if taken[item] != stamp:
                    taken[item] = stamp
                    out[count] = item
                    count += 1
        out[:count].sort()
        row_count[b] = count
    return True


@njit(cache=True, fastmath=_EXACT, nogil=True)
def _train_user(rows: np.ndarray, emb: np.ndarray, pos: np.ndarray, pair_p: np.ndarray,
                pair_q: np.ndarray, step_ptr: np.ndarray, lr: np.float32, reg: np.float32,
                grad: np.ndarray, touched: np.ndarray, moved: np.ndarray) -> None:
    """SGD of Eq. 15 for one user, in place on its private ``rows`` and embedding ``emb``.

    ``pos`` (the ego graph), ``pair_p`` and ``pair_q`` index ``rows``; step ``t`` trains pairs
    ``step_ptr[t]:step_ptr[t+1]``. Every gradient is taken at the step's start values
    (``d cos(a, b) / da = (b^ - cos a^) / |a|``), then the rows the step touched move.
    ``grad`` (zero) and ``touched`` (False) are scratch of at least ``len(rows)`` rows, left as
    found; ``moved`` is scratch too.
    """
    n, d = len(pos), rows.shape[1]
    half = np.float32(0.5)
    s = np.float32(1.0 / np.sqrt(np.float32(n)))
    tiny = np.float32(1e-12)
    g_vec = np.zeros(d, np.float32)
    g_emb = np.zeros(d, np.float32)
    u_hat = np.zeros(d, np.float32)
    e_half = np.zeros(d, np.float32)  # the user's share of v_i: e_u / (2 sqrt(n))
    p_hat = np.zeros(d, np.float32)
    q_hat = np.zeros(d, np.float32)
    for t in range(len(step_ptr) - 1):
        count = step_ptr[t + 1] - step_ptr[t]
        if count == 0:
            continue
        w = np.float32(1.0) / np.float32(count)  # the step's loss is the mean over its pairs
        for c in range(d):
            u_hat[c] = 0
        for i in range(n):
            for c in range(d):
                u_hat[c] += rows[pos[i], c]
        u_norm2 = np.float32(0)
        for c in range(d):  # Eq. 13-14, L = 1: u = (e_u + sum_i v_i / sqrt(n)) / 2
            u_hat[c] = half * (emb[c] + u_hat[c] * s)
            u_norm2 += u_hat[c] * u_hat[c]
            e_half[c] = half * s * emb[c]
            g_vec[c] = 0
            g_emb[c] = 0
        u_norm = max(np.sqrt(u_norm2), tiny)
        for c in range(d):
            u_hat[c] /= u_norm
        n_moved = 0
        for i in range(n):  # every ego item feeds u, so every positive moves
            if not touched[pos[i]]:
                touched[pos[i]] = True
                moved[n_moved] = pos[i]
                n_moved += 1
        two_reg_w = 2 * reg * w
        for x in range(step_ptr[t], step_ptr[t + 1]):
            p, q = pair_p[x], pair_q[x]
            if not touched[q]:
                touched[q] = True
                moved[n_moved] = q
                n_moved += 1
            pp = np.float32(0)
            qq = np.float32(0)
            up = np.float32(0)
            uq = np.float32(0)
            for c in range(d):
                vp = half * rows[p, c] + e_half[c]
                vq = half * rows[q, c]
                p_hat[c] = vp
                q_hat[c] = vq
                pp += vp * vp
                qq += vq * vq
                up += u_hat[c] * vp
                uq += u_hat[c] * vq
            p_norm = max(np.sqrt(pp), tiny)
            q_norm = max(np.sqrt(qq), tiny)
            cos_p, cos_q = up / p_norm, uq / q_norm
            g_x = -w / (np.float32(1) + np.exp(cos_p - cos_q))  # d -ln sigma(x) / dx, x = margin
            a = g_x / u_norm
            gp_scale = g_x / p_norm
            gq_scale = -g_x / q_norm
            margin = cos_p - cos_q
            inv_p, inv_q = np.float32(1) / p_norm, np.float32(1) / q_norm
            for c in range(d):
                ph = p_hat[c] * inv_p
                qh = q_hat[c] * inv_q
                g_vec[c] += a * (ph - qh - margin * u_hat[c])
                gp = gp_scale * (u_hat[c] - cos_p * ph)
                gq = gq_scale * (u_hat[c] - cos_q * qh)
                g_emb[c] += half * s * gp
                grad[p, c] += half * gp + two_reg_w * rows[p, c]
                grad[q, c] += half * gq + two_reg_w * rows[q, c]
        for c in range(d):
            emb[c] -= lr * (half * g_vec[c] + g_emb[c] + 2 * reg * emb[c])
            g_vec[c] *= half * s  # now the gradient of each ego row through u
        for i in range(n):
            for c in range(d):
                grad[pos[i], c] += g_vec[c]
        for m in range(n_moved):
            r = moved[m]
            for c in range(d):
                rows[r, c] -= lr * grad[r, c]
                grad[r, c] = 0
            touched[r] = False


@njit(cache=True, nogil=True)
def _pairs(user: int, pos: np.ndarray, neg: np.ndarray, k: int, epochs: int, batch_size: int,
           seed: int, round_: int, pair_p: np.ndarray, pair_q: np.ndarray,
           step_ptr: np.ndarray) -> int:
    """Each SGD step's (positive row, negative row) pairs, in step order, and the step bounds;
    returns the number of steps.

    Epoch-major; pair ``(i, j)`` of epoch ``e`` uses negative slot ``i k E + e k + j``. With
    ``batch_size`` > 0, each epoch's pairs are shuffled by ``counter_uniform(seed, round, user,
    slot, MINIBATCH_KEY)`` (stable on ties), then cut into steps of ``batch_size``.
    """
    n = len(pos)
    per_epoch = n * k
    steps_per_epoch = 1 if batch_size <= 0 else (per_epoch + batch_size - 1) // batch_size
    step_ptr[0] = 0
    s, r, u = np.uint64(seed), np.uint64(round_), np.uint64(user)
    for e in range(epochs):
        base = e * per_epoch
        for i in range(n):
            for j in range(k):
                pair_p[base + i * k + j] = pos[i]
                pair_q[base + i * k + j] = neg[i * k * epochs + e * k + j]
        if batch_size > 0:
            keys = np.empty(per_epoch, np.uint64)
            for i in range(n):
                for j in range(k):
                    slot = np.uint64(i * k * epochs + e * k + j)
                    keys[i * k + j] = hash5(s, r, u, slot, np.uint64(MINIBATCH_KEY)) >> \
                        np.uint64(11)
            order = np.argsort(keys, kind="mergesort")
            pair_p[base: base + per_epoch] = pair_p[base + order]
            pair_q[base: base + per_epoch] = pair_q[base + order]
        for t in range(steps_per_epoch):
            end = base + per_epoch if batch_size <= 0 else min(base + (t + 1) * batch_size,
                                                                 base + per_epoch)
            step_ptr[e * steps_per_epoch + t + 1] = end
    return steps_per_epoch * epochs


@njit(cache=True, nogil=True)
def train_rows(first: int, last: int, users: np.ndarray, indptr: np.ndarray,
               items: np.ndarray, negatives: np.ndarray, row_items: np.ndarray,
               row_ptr: np.ndarray, row_offset: np.ndarray, table: np.ndarray,
               user_emb: np.ndarray, k: int, epochs: int, batch_size: int, lr: float,
               reg: float, seed: int, round_: int, row_value: np.ndarray) -> None:
    """Pass 2 for users ``first:last``: each one's SGD (:func:`_train_user`) on its rows,
    written to ``row_value`` at ``row_ptr``; ``row_items`` (from :func:`sample_rows`) at
    ``row_offset``. Scratch is allocated once per range: per-user buffers of this size are
    large enough to be mapped and faulted in afresh for every user."""
    per = k * epochs
    lr32, reg32 = np.float32(lr), np.float32(reg)
    max_rows, max_pairs = 0, 0
    for b in range(first, last):
        max_rows = max(max_rows, row_ptr[b + 1] - row_ptr[b])
        max_pairs = max(max_pairs, (indptr[b + 1] - indptr[b]) * per)
    row_of = np.zeros(table.shape[0], np.int64)  # item -> row of the current user
    grad = np.zeros((max_rows, table.shape[1]), np.float32)
    touched = np.zeros(max_rows, np.bool_)
    moved = np.empty(max_rows, np.int64)
    pair_p = np.empty(max_pairs, np.int64)
    pair_q = np.empty(max_pairs, np.int64)
    most_steps = max_pairs if batch_size > 0 else epochs
    step_ptr = np.empty(most_steps + 1, np.int64)
    for b in range(first, last):
        lo, hi = indptr[b], indptr[b + 1]
        if hi == lo:
            continue
        mine = row_items[row_offset[b]: row_offset[b] + row_ptr[b + 1] - row_ptr[b]]
        rows = row_value[row_ptr[b]: row_ptr[b + 1]]
        for r in range(len(mine)):
            rows[r] = table[mine[r]]
            row_of[mine[r]] = r
        pos = row_of[items[lo:hi]]
        neg = row_of[negatives[lo * per: hi * per]]
        steps = _pairs(users[b], pos, neg, k, epochs, batch_size, seed, round_, pair_p, pair_q,
                       step_ptr)
        count = (hi - lo) * per
        _train_user(rows, user_emb[b], pos, pair_p[:count], pair_q[:count],
                    step_ptr[:steps + 1], lr32, reg32, grad, touched, moved)


@njit(cache=True, nogil=True)
def add_weighted_deltas(first: int, last: int, row_user: np.ndarray, row_item: np.ndarray,
                        row_value: np.ndarray, start: np.ndarray, weights: np.ndarray,
                        acc: np.ndarray) -> None:
    """``acc += sum_r w[row_user[r]] (row_value[r] - start[row_item[r]])`` over rows
    ``first:last``: the deltas of Eq. 16's weighted sum."""
    for r in range(first, last):
        w, i = weights[row_user[r]], row_item[r]
        for c in range(start.shape[1]):
            acc[i, c] += w * (row_value[r, c] - start[i, c])


_POOL: tuple[int, int, ThreadPoolExecutor] | None = None
"""(process id, thread count, pool): a forked child inherits the pool but not its threads, so a
pool made in another process is replaced, never used."""
_POOL_LOCK = threading.Lock()


def run_ranges(kernel: Callable[..., object], cost: np.ndarray, threads: int,
               *args: object) -> list[object]:
    """``kernel(first, last, *args)`` over contiguous ranges of about equal summed ``cost``,
    on ``threads`` threads; the results in range order."""
    global _POOL
    total = np.cumsum(cost)
    count = max(1, min(len(cost), threads * RANGES_PER_THREAD)) if threads > 1 else 1
    cuts = np.searchsorted(total, total[-1] * np.arange(1, count) / count) if len(cost) else []
    edges = np.unique(np.concatenate([[0], cuts, [len(cost)]])).tolist()
    ranges = list(itertools.pairwise(edges))
    if threads <= 1 or len(ranges) == 1:
        return [kernel(lo, hi, *args) for lo, hi in ranges]
    with _POOL_LOCK:
        if _POOL is None or _POOL[:2] != (os.getpid(), threads):
            if _POOL is not None and _POOL[0] == os.getpid():
                _POOL[2].shutdown()
            _POOL = (os.getpid(), threads,
                     ThreadPoolExecutor(threads, thread_name_prefix="fedshare-kernel"))
        pool = _POOL[2]
    return list(pool.map(lambda r: kernel(r[0], r[1], *args), ranges))


def weighted_delta_sum(row_user: np.ndarray, row_item: np.ndarray, row_value: np.ndarray,
                       start: np.ndarray, weights: np.ndarray, threads: int) -> np.ndarray:
    """:func:`add_weighted_deltas` over all rows: fixed row ranges (by count, never by thread)
    each summed into its own table, then added in order, so any thread count gives the same
    float result."""
    n = len(row_item)
    parts = int(min(8, max(1, n // (1 << 16))))
    partial = np.zeros((parts, *start.shape), np.float32)

    def part(first: int, last: int) -> None:
        for t in range(first, last):
            add_weighted_deltas(t * n // parts, (t + 1) * n // parts, row_user, row_item,
                                row_value, start, weights, partial[t])

    run_ranges(part, np.ones(parts), threads)
    return partial.sum(0) if parts > 1 else partial[0]
