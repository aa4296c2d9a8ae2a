"""What an honest-but-curious server holds of a device's train reply, per deployment.

A reply is the pair the aggregation needs (:mod:`fedshare.federated.aggregation`):
``sum_u w_u (V_u - V_s)`` over the reply's users (``delta``, ``[I, d]``) and the per-row weights
``sum_u w_u 1[u uploaded row i]`` (``row_weight``, ``[I]``). A one-user device's reply holds one
user; a cohort node's reply the sum of its k trained users; under secure aggregation the server
holds only the sum over the round's devices. Every observation is therefore a sum of single-user
replies, built here from the project's own client code (:func:`train_local`, then
:func:`fedshare.defences.defend_upload`, exactly as :meth:`ClientPopulation.train` does for a
one-user node; a test checks the equality).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fedshare.defences import UploadDefence, defend_upload, device_generator
from fedshare.models.local import LocalTrainConfig, UserBatch, train_local


@dataclass
class Replies:
    """Single-user replies of a batch of users, dense (``delta[b]`` is user b's weighted
    delta, ``row_weight[b]`` its per-row weights, ``weight[b]`` its |D_u|)."""

    users: np.ndarray
    delta: Tensor
    row_weight: Tensor
    weight: Tensor

    def observe(self, positions: np.ndarray) -> tuple[Tensor, Tensor]:
        """The server's view of the sum of the replies at ``positions``."""
        index = torch.as_tensor(np.asarray(positions, dtype=np.int64))
        return self.delta[index].sum(0), self.row_weight[index].sum(0)


def single_replies(users: np.ndarray, local_items: list[np.ndarray],
                   held_items: list[np.ndarray], embeddings: Tensor, table: Tensor,
                   local: LocalTrainConfig, seed: int, round_: int,
                   defence: UploadDefence | None = None) -> tuple[Replies, Tensor]:
    """Every user of ``users`` trains alone from ``table`` (one-user devices) and replies.

    Returns the replies and the users' trained embeddings.
    """
    users = np.asarray(users, dtype=np.int64)
    num_items, dim = table.shape
    batch = UserBatch.from_lists(users, local_items, held_items, num_items)
    update = train_local(batch, table, embeddings, local, seed, round_)
    weights = torch.from_numpy(batch.sizes).float()
    delta = torch.zeros(len(users), num_items, dim)
    row_weight = torch.zeros(len(users), num_items)
    for b, user in enumerate(users.tolist()):
        mine = update.row_user == b
        items = update.row_item[mine]
        deltas = update.row_value[mine].float() - table[items].float()
        rows, values = items, deltas
        if defence is not None:
            rows, values = defend_upload(items, deltas, num_items, defence,
                                         device_generator(seed, round_, int(user)))
        delta[b].index_add_(0, rows, weights[b] * values)
        row_weight[b].index_add_(0, rows, weights[b].expand(len(rows)))
    return Replies(users, delta, row_weight, weights), update.user_embeddings
