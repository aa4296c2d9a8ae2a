"""What a node's replies must satisfy before the server uses them.

Share replies (Eq. 7): the users a node serves are its own (no other node claimed them), every
shared interaction belongs to one of them, ids lie in the catalogue, nothing is shared twice.
Train replies (Eq. 16):

A reply that fails a check is rejected with a one-line reason and never averaged: a NaN, an
infinity, a table of the wrong shape or dtype, a weight that is negative or not finite, more
trained users than the node was asked to train, a weight above what its users' |D_u| add up to,
or per-row weights that exceed the node's total
(each row's weight is the part of the total whose users touched it). Flower-free, so the
strategy and the tests share it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedshare.federated.population import NodeUpdate
from fedshare.storage_ledger import FRU_CLIENT, StorageLedger, client


def update_problem(update: NodeUpdate, num_items: int, dim: int, sampled: int,
                   max_weight: float = math.inf) -> str | None:
    """Why ``update`` (a node's reply to a train message for ``sampled`` users whose |D_u| sum
    to ``max_weight``) must be rejected, or ``None`` when it may be averaged."""
    table, row_weight = update.table, update.row_weight
    if table.dtype != torch.float32 or row_weight.dtype != torch.float32:
        return f"dtype {table.dtype}/{row_weight.dtype}, expected float32"
    if tuple(table.shape) != (num_items, dim):
        return f"item table of shape {tuple(table.shape)}, expected {(num_items, dim)}"
    if tuple(row_weight.shape) != (num_items,):
        return f"row weights of shape {tuple(row_weight.shape)}, expected {(num_items,)}"
    if not bool(torch.isfinite(table).all()):
        return "non-finite values in the item table"
    if not math.isfinite(update.weight) or not 0 <= update.weight <= max_weight:
        return f"weight {update.weight}, at most {max_weight} expected"
    if update.weight > 0 and update.num_users == 0:
        return "a weight without trained users"
    if not bool(torch.isfinite(row_weight).all()) or bool((row_weight < 0).any()):
        return "negative or non-finite row weights"
    if bool((row_weight > update.weight * (1 + 1e-6) + 1e-6).any()):
        return "a row weight exceeds the node's total weight"
    if not 0 <= update.num_users <= sampled:
        return f"{update.num_users} users trained, {sampled} were sampled"
    return None


def share_problem(served: np.ndarray, users: np.ndarray, items: np.ndarray, num_users: int,
                  num_items: int, claimed: set[int]) -> str | None:
    """Why a node's share reply must be rejected (``claimed``: users other nodes serve)."""
    if served.ndim != 1 or users.shape != items.shape or users.ndim != 1 \
            or any(a.dtype.kind not in "iu" for a in (served, users, items)):
        return "malformed share arrays"
    if len(served) and (served.min() < 0 or served.max() >= num_users):
        return "a served user outside the catalogue"
    if len(np.unique(served)) != len(served) or claimed & set(served.tolist()):
        return "a served user is listed twice or served by another node"
    if len(items) and (items.min() < 0 or items.max() >= num_items):
        return "an unknown item"
    if not np.isin(users, served).all():
        return "shared interactions of users the node does not serve"
    if len(np.unique(users * num_items + items)) != len(users):
        return "an interaction shared twice"
    return None


class ReplyChecks:
    """The server's judge of train replies.

    Args:
        num_items, dim: the shape of V_s.
        local_counts: |I_local| per user, from the share round (the most a user may weigh).
        ledger: where the FRU store sizes that accepted replies report are recorded.
        max_failed: a round completes while at most this fraction of the nodes asked to train
            fail, time out or send a rejected reply; beyond it the round changes nothing.
    """

    def __init__(self, num_items: int, dim: int, local_counts: dict[int, int],
                 ledger: StorageLedger, max_failed: float = 0.5) -> None:
        self.num_items, self.dim = num_items, dim
        self.local_counts = local_counts
        self.ledger = ledger
        self.max_failed = max_failed

    def train_problem(self, asked: list[int] | None, update: NodeUpdate,
                      fru: list[tuple[int, int]]) -> str | None:
        """Why ``update`` may not be averaged (``asked``: the users the node was asked to
        train, ``None`` if it was not asked), or ``None``: then the FRU store sizes it reports
        go to the ledger."""
        if asked is None:
            return "a reply from a node that was not asked to train"
        problem = update_problem(update, self.num_items, self.dim, len(asked),
                                 sum(self.local_counts.get(u, 0) for u in asked))
        if problem is None:
            for user, nbytes in fru:  # FRU's client-side stores, as the nodes report them
                self.ledger.set(client(user), FRU_CLIENT, nbytes)
        return problem

    def too_many_failures(self, asked: int, accepted: int) -> bool:
        """Whether more than ``max_failed`` of a round's ``asked`` nodes gave no accepted
        reply."""
        asked = max(asked, 1)
        return (asked - accepted) / asked > self.max_failed
