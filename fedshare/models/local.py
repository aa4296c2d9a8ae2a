"""Client-side training (Sec. IV-B2): one-layer LightGCN on each user's ego graph, cosine BPR.

On a user's first-order ego graph every item has the single neighbour ``u`` (|N(i)| = 1), so
Eq. 13-14 with L = 1 and ``alpha_l = 1/2`` reduce to::

    u   = (e_u + sum_{i in I_u} v_i / sqrt(|I_u|)) / 2
    v_i = (v_i + e_u / sqrt(|I_u|)) / 2          for i in I_u
    v_j = v_j / 2                                for a sampled negative j (no neighbour)

and the loss is Eq. 15: ``-ln sigma(cos(u, v_i) - cos(u, v_j)) + lambda ||Theta_u||^2``.

Batching: every user owns a private copy of the rows it touches (its positives and its sampled
negatives; SGD never moves any other row), so many users train in one call: their rows lie in
flat, segment-indexed arrays and a compiled loop (:mod:`fedshare.models.local_kernel`) trains
one user after another, in cache, on torch's thread budget. Per-user losses are summed, never
averaged across users, and parameters are disjoint, so each user's SGD trajectory is exactly the
one it would follow alone; a single user is a batch of one. Negatives come from
:mod:`fedshare.sampling`'s counter-based stream, so they do not depend on who else is in the
batch either.

Choices where the paper is silent: plain SGD (an adaptive optimiser would keep moving rows whose
gradient is zero in a step); the L2 term covers the user embedding and the item rows of the
current step, as LightGCN's reference implementation does; ``num_negatives`` negatives per
positive, fresh every epoch; an epoch is one full-batch step unless ``batch_size`` splits a
user's pairs into shuffled mini-batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch
from torch import Tensor

from fedshare.errors import FedShareError


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
        known = np.concatenate(keys) if keys else np.zeros(0, np.int64)
        if not (known[1:] > known[:-1]).all():  # already sorted and unique for sorted users
            known = np.unique(known)
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
        deltas = _kernel().weighted_delta_sum(
            self.row_user.numpy(), self.row_item.numpy(),
            self.row_value.detach().to(torch.float32).contiguous().numpy(),
            start.detach().to(torch.float32).contiguous().numpy(),
            weights.detach().to(torch.float32).numpy(), torch.get_num_threads())
        total += torch.from_numpy(deltas).to(start.dtype)
        return total


def _kernel() -> ModuleType:
    """The compiled kernels, imported on first use: numba and LLVM add about 150 MB to a
    process, and only processes that train clients need them."""
    from fedshare.models import local_kernel

    return local_kernel


def user_representation(user_emb: Tensor, item_table: Tensor, indptr: Tensor,
                        items: Tensor) -> Tensor:
    """One-layer ego-graph LightGCN user vector (Eq. 13-14, L = 1), for a batch of users."""
    sizes = (indptr[1:] - indptr[:-1]).to(item_table.dtype)
    owner = torch.repeat_interleave(torch.arange(len(sizes)), indptr[1:] - indptr[:-1])
    agg = torch.zeros_like(user_emb).index_add(0, owner, item_table[items])
    return 0.5 * (user_emb + agg / sizes.clamp(min=1).sqrt()[:, None])


def train_local(batch: UserBatch, item_table: Tensor, user_emb: Tensor, config: LocalTrainConfig,
                seed: int = 0, round_: int = 0) -> LocalUpdate:
    """Train every user of ``batch`` on its own ego graph, as if alone (see module docstring).

    The loop itself is compiled (:mod:`fedshare.models.local_kernel`): pass 1 draws each
    user's negatives and its private rows, pass 2 runs each user's SGD in cache.

    Args:
        batch: users and their local training items.
        item_table: the global table V_s every user starts from (Eq. 12), ``[I, d]``.
        user_emb: the users' private embeddings ``[B, d]`` (from the client's state).
        config: local hyper-parameters.
        seed, round_: keys of the negative-sampling stream.
    """
    num_items, dim = item_table.shape
    users, indptr, items = batch.users, batch.indptr, batch.items
    per = config.num_negatives * config.epochs
    known_lo = np.searchsorted(batch.known_keys, users * num_items)
    known_hi = np.searchsorted(batch.known_keys, (users + 1) * num_items)
    negatives = np.empty(len(items) * per, dtype=np.int64)
    row_items = np.empty(len(items) * (1 + per), dtype=np.int64)
    row_count = np.zeros(len(users), dtype=np.int64)
    table = item_table.detach().to(torch.float32).contiguous().numpy()
    emb = user_emb.detach().to(torch.float32).numpy().copy()
    threads, kernel = torch.get_num_threads(), _kernel()
    sampled = kernel.run_ranges(kernel.sample_rows, batch.sizes, threads, users, indptr, items,
                                known_lo, known_hi, batch.known_keys % num_items, num_items,
                                config.num_negatives, config.epochs, seed, round_, 1000,
                                negatives, row_items, row_count)
    if not all(sampled):
        raise FedShareError("cannot sample negatives: some user interacted with (almost) every "
                            "item")
    row_ptr = np.concatenate([[0], np.cumsum(row_count)])
    row_offset = indptr[:-1] * (1 + per)
    row_value = np.empty((int(row_ptr[-1]), dim), dtype=np.float32)
    kernel.run_ranges(kernel.train_rows, batch.sizes, threads, users, indptr, items, negatives,
                      row_items, row_ptr, row_offset, table, emb, config.num_negatives,
                      config.epochs, config.batch_size or 0, config.lr, config.reg, seed, round_,
                      row_value)
    row_user = np.repeat(np.arange(len(users)), row_count)
    row_item = row_items[np.repeat(row_offset - row_ptr[:-1], row_count)
                         + np.arange(int(row_ptr[-1]))]
    dtype = item_table.dtype
    return LocalUpdate(users, torch.from_numpy(emb).to(dtype), torch.from_numpy(row_user),
                       torch.from_numpy(row_item), torch.from_numpy(row_value).to(dtype))
