"""Client-side training (Sec. IV-B2): one-layer LightGCN on each user's ego graph, cosine BPR.

On a user's first-order ego graph every item has the single neighbour ``u`` (|N(i)| = 1), so
Eq. 13-14 with L = 1 and ``alpha_l = 1/2`` reduce to::

    u   = (e_u + sum_{i in I_u} v_i / sqrt(|I_u|)) / 2
    v_i = (v_i + e_u / sqrt(|I_u|)) / 2          for i in I_u
    v_j = v_j / 2                                for a sampled negative j (no neighbour)

and the loss is Eq. 15: ``-ln sigma(cos(u, v_i) - cos(u, v_j)) + lambda ||Theta_u||^2``.

Batching: every user owns a private copy of the rows it touches (its positives and its sampled
negatives; SGD never moves any other row), so many users train in one call on flat, segment-
indexed tensors. Per-user losses are summed, never averaged across users, and parameters are
disjoint, so each user's SGD trajectory is exactly the one it would follow alone; a single user
is a batch of one. Negatives come from :mod:`fedshare.sampling`'s counter-based stream, so they
do not depend on who else is in the batch either.

Choices where the paper is silent: plain SGD (an adaptive optimiser would keep moving rows whose
gradient is zero in a step); the L2 term covers the user embedding and the item rows of the
current step, as LightGCN's reference implementation does; ``num_negatives`` negatives per
positive, fresh every epoch; an epoch is one full-batch step unless ``batch_size`` splits a
user's pairs into shuffled mini-batches.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fedshare.sampling import counter_uniform, sample_negatives


@dataclass(frozen=True)
class LocalTrainConfig:
    """Hyper-parameters of local training (Eq. 15).

    Args:
        epochs: local epochs over the user's local interactions.
        lr: SGD learning rate.
        reg: lambda of Eq. 15.
        num_negatives: sampled negatives per positive and epoch.
        batch_size: (positive, negative) pairs per step of one user; ``None`` = full batch.
    """

    epochs: int = 1
    lr: float = 0.5
    reg: float = 1e-4
    num_negatives: int = 1
    batch_size: int | None = None


@dataclass
class UserBatch:
    """The users trained in one call and their data, as flat CSR arrays.

    Args:
        users: global ids, shape ``[B]``.
        indptr: ``[B + 1]``; user ``b``'s ego-graph (= training) items are
            ``items[indptr[b]:indptr[b+1]]``.
        items: concatenated item ids.
        known_keys: sorted ``user * num_items + item`` of every interaction the users know
            (negatives are drawn outside it: a client knows its whole history).
    """

    users: np.ndarray
    indptr: np.ndarray
    items: np.ndarray
    known_keys: np.ndarray

    @classmethod
    def from_lists(cls, users: list[int] | np.ndarray, train_items: list[np.ndarray],
                   known_items: list[np.ndarray], num_items: int) -> UserBatch:
        users = np.asarray(users, dtype=np.int64)
        indptr = np.zeros(len(users) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in train_items], out=indptr[1:])
        items = np.concatenate([np.asarray(x, np.int64) for x in train_items]) if len(
            users) else np.zeros(0, np.int64)
        keys = [u * num_items + np.asarray(k, np.int64) for u, k in zip(users, known_items,
                                                                         strict=True)]
        known = np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
        return cls(users, indptr, items, known)

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.indptr)

    def subset(self, lo: int, hi: int) -> UserBatch:
        """Users ``lo:hi`` of the batch (their known keys stay in the shared sorted array)."""
        indptr = self.indptr[lo:hi + 1]
        return UserBatch(self.users[lo:hi], indptr - indptr[0],
                         self.items[indptr[0]:indptr[-1]], self.known_keys)


@dataclass
class LocalUpdate:
    """What local training produced for a batch of users.

    ``row_user[r]`` (batch position) owns trained item row ``row_item[r]`` with value
    ``row_value[r]``; every other row of that user's table equals the global table it started
    from. ``user_embeddings`` stay on the client (never uploaded, Sec. IV-B3).
    """

    users: np.ndarray
    user_embeddings: Tensor
    row_user: Tensor
    row_item: Tensor
    row_value: Tensor

    def item_table(self, b: int, start: Tensor) -> Tensor:
        """User ``b``'s full uploaded table V_u (Eq. 16's summand)."""
        table = start.clone()
        mine = self.row_user == b
        table[self.row_item[mine]] = self.row_value[mine]
        return table

    def weighted_sum(self, start: Tensor, weights: Tensor) -> Tensor:
        """``sum_b w_b V_b`` without materialising any V_b: ``W * start + sum_b w_b delta_b``."""
        total = start * weights.sum()
        delta = (self.row_value - start[self.row_item]) * weights[self.row_user, None]
        return total.index_add(0, self.row_item, delta)


def user_representation(user_emb: Tensor, item_table: Tensor, indptr: Tensor,
                        items: Tensor) -> Tensor:
    """One-layer ego-graph LightGCN user vector (Eq. 13-14, L = 1), for a batch of users."""
    sizes = (indptr[1:] - indptr[:-1]).to(item_table.dtype)
    owner = torch.repeat_interleave(torch.arange(len(sizes)), indptr[1:] - indptr[:-1])
    agg = torch.zeros_like(user_emb).index_add(0, owner, item_table[items])
    return 0.5 * (user_emb + agg / sizes.clamp(min=1).sqrt()[:, None])


CHUNK_PAIRS = 1 << 15
"""Users are trained in chunks of about this many (positive, negative) pairs per epoch: their
working set stays in cache, and memory stays flat however many users a cohort holds."""


def train_local(batch: UserBatch, item_table: Tensor, user_emb: Tensor, config: LocalTrainConfig,
                seed: int = 0, round_: int = 0) -> LocalUpdate:
    """Train every user of ``batch`` on its own ego graph, as if alone (see module docstring).

    Args:
        batch: users and their local training items.
        item_table: the global table V_s every user starts from (Eq. 12), ``[I, d]``.
        user_emb: the users' private embeddings ``[B, d]`` (from the client's state).
        config: local hyper-parameters.
        seed, round_: keys of the negative-sampling stream.
    """
    pairs = np.cumsum(batch.sizes * config.num_negatives)
    bounds = np.searchsorted(pairs, np.arange(CHUNK_PAIRS, int(pairs[-1]) if len(pairs) else 0,
                                              CHUNK_PAIRS), side="right")
    edges = [0, *np.unique(bounds).tolist(), len(batch.users)]
    parts = [_train_chunk(batch.subset(lo, hi), item_table, user_emb[lo:hi], config, seed,
                          round_) for lo, hi in itertools.pairwise(edges) if hi > lo]
    if not parts:
        return _train_chunk(batch, item_table, user_emb, config, seed, round_)
    offsets = np.cumsum([0, *[len(p.users) for p in parts[:-1]]])
    return LocalUpdate(batch.users, torch.cat([p.user_embeddings for p in parts]),
                       torch.cat([p.row_user + int(o) for p, o in zip(parts, offsets,
                                                                      strict=True)]),
                       torch.cat([p.row_item for p in parts]),
                       torch.cat([p.row_value for p in parts]))


def _train_chunk(batch: UserBatch, item_table: Tensor, user_emb: Tensor,
                 config: LocalTrainConfig, seed: int, round_: int) -> LocalUpdate:
    """:func:`train_local` for one chunk of users, with the gradient of Eq. 15 written out.

    The users' parameters are disjoint, so each step's gradient is per pair and per user;
    written out (``d cos(a, b) / da = (b^ - cos a^) / |a|``) it costs a few vector operations per
    pair, without the autograd graph that scatters into a zero-filled copy of every row per
    lookup. Tests compare it with autograd on hand-built cases.
    """
    num_items = item_table.shape[0]
    sizes = batch.sizes
    k, epochs = config.num_negatives, config.epochs
    # One (positive, negative) pair per positive, negative slot and epoch.
    pair_owner = np.repeat(np.repeat(np.arange(len(sizes)), sizes), k * epochs)
    pair_pos = np.repeat(batch.items, k * epochs)
    within = np.arange(len(pair_owner)) - np.repeat(batch.indptr[:-1] * k * epochs,
                                                    sizes * k * epochs)
    pair_epoch = within % (k * epochs) // k
    slot = within  # distinct for every draw of one user
    pair_neg = sample_negatives(batch.users[pair_owner], slot, batch.known_keys, num_items,
                                seed, round_)
    pair_step = _step_of_pairs(batch.users, pair_owner, pair_epoch, slot, sizes * k, config,
                               seed, round_)

    # Private rows: each user's positives and negatives, deduplicated per user.
    keys = np.concatenate([pair_owner * num_items + pair_pos, pair_owner * num_items + pair_neg,
                           np.repeat(np.arange(len(sizes)), sizes) * num_items + batch.items])
    row_keys, inverse = _unique_inverse(keys, len(sizes) * num_items)
    n_pairs = len(pair_owner)
    row_user = torch.from_numpy(row_keys // num_items)
    row_item = torch.from_numpy(row_keys % num_items)
    rows = item_table[row_item].clone()
    users = user_emb.detach().clone()
    if n_pairs == 0:
        return LocalUpdate(batch.users, users, row_user, row_item, rows)

    # Pairs grouped by step (stable: within a step, in user order).
    small = pair_step.astype(np.int16) if pair_step.max() < 2**15 else pair_step
    order = np.argsort(small, kind="stable")  # radix sort for 16-bit keys
    starts = np.searchsorted(pair_step[order], np.arange(int(pair_step.max()) + 2))
    pos_row = torch.from_numpy(inverse[:n_pairs][order])
    neg_row = torch.from_numpy(inverse[n_pairs: 2 * n_pairs][order])
    owner_all = torch.from_numpy(pair_owner[order])
    ego_row = torch.from_numpy(inverse[2 * n_pairs:])
    ego_owner = torch.from_numpy(np.repeat(np.arange(len(sizes)), sizes))
    inv_sqrt = 1.0 / torch.from_numpy(sizes).clamp(min=1).to(rows.dtype).sqrt()
    lr, reg, num_users = config.lr, config.reg, len(sizes)
    for step in range(len(starts) - 1):
        lo, hi = int(starts[step]), int(starts[step + 1])
        if hi == lo:
            continue
        owner, p_idx, n_idx = owner_all[lo:hi], pos_row[lo:hi], neg_row[lo:hi]
        count = torch.bincount(owner, minlength=num_users).to(rows.dtype)
        weight = 1.0 / count[owner]  # each user's loss is the mean over its pairs of the step
        ego_sum = torch.zeros_like(users).index_add_(0, ego_owner, rows[ego_row])
        u = (0.5 * (users + ego_sum * inv_sqrt[:, None]))[owner]  # Eq. 13-14, L = 1
        pos, neg = rows[p_idx], rows[n_idx]
        scaled = inv_sqrt[owner, None]
        v_pos = 0.5 * (pos + users[owner] * scaled)
        v_neg = 0.5 * neg
        u_norm, pos_norm, neg_norm = (x.norm(dim=1).clamp(min=1e-12) for x in (u, v_pos, v_neg))
        u_hat, pos_hat, neg_hat = u / u_norm[:, None], v_pos / pos_norm[:, None], \
            v_neg / neg_norm[:, None]
        cos_pos, cos_neg = (u_hat * pos_hat).sum(1), (u_hat * neg_hat).sum(1)
        # d/dx of -ln sigma(x), x = cos_pos - cos_neg, times the pair's weight
        g_x = -torch.sigmoid(cos_neg - cos_pos) * weight
        g_u = (g_x / u_norm)[:, None] * (pos_hat - neg_hat
                                         - (cos_pos - cos_neg)[:, None] * u_hat)
        g_pos = (g_x / pos_norm)[:, None] * (u_hat - cos_pos[:, None] * pos_hat)
        g_neg = (-g_x / neg_norm)[:, None] * (u_hat - cos_neg[:, None] * neg_hat)
        g_user_vec = torch.zeros_like(users).index_add_(0, owner, g_u)
        g_users = 0.5 * g_user_vec + torch.zeros_like(users).index_add_(
            0, owner, 0.5 * scaled * g_pos) + 2 * reg * users * (count > 0)[:, None]
        two_reg = (2 * reg * weight)[:, None]
        g_pos_rows = 0.5 * g_pos + two_reg * pos
        g_neg_rows = 0.5 * g_neg + two_reg * neg
        g_ego_rows = (0.5 * inv_sqrt[:, None] * g_user_vec)[ego_owner]
        # Every gradient is taken at the step's start values, then SGD moves every row.
        # (index_add_ with ``alpha`` takes a path about 8x slower: scale first.)
        rows.index_add_(0, p_idx, g_pos_rows.mul_(-lr))
        rows.index_add_(0, n_idx, g_neg_rows.mul_(-lr))
        rows.index_add_(0, ego_row, g_ego_rows.mul_(-lr))
        users -= lr * g_users
    return LocalUpdate(batch.users, users, row_user, row_item, rows)


def _unique_inverse(keys: np.ndarray, key_space: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(keys, return_inverse=True)``; by marking a dense table when the key space is
    small (a chunk of users times the items), which avoids sorting."""
    if key_space > 1 << 24:
        return np.unique(keys, return_inverse=True)
    present = np.zeros(key_space, dtype=bool)
    present[keys] = True
    position = np.cumsum(present) - 1
    return np.flatnonzero(present), position[keys]


def _step_of_pairs(users: np.ndarray, owner: np.ndarray, epoch: np.ndarray, slot: np.ndarray,
                   pairs_per_epoch: np.ndarray, config: LocalTrainConfig, seed: int,
                   round_: int) -> np.ndarray:
    """The SGD step at which each pair is used: epoch-major, shuffled mini-batches per user."""
    if config.batch_size is None:
        return epoch.astype(np.int64)
    steps_per_epoch = -(-pairs_per_epoch // config.batch_size)
    idx = np.arange(len(owner))
    order = np.lexsort((counter_uniform(seed, round_, users[owner], slot, 1 << 40), epoch, owner))
    group = owner[order] * (config.epochs + 1) + epoch[order]
    first = np.searchsorted(group, group, side="left")
    rank = np.empty(len(owner), dtype=np.int64)
    rank[order] = idx - first
    return epoch * steps_per_epoch[owner] + rank // config.batch_size
