"""The message payloads exchanged by the FedShare ServerApp and ClientApps.

One place for the record keys so that both sides agree:

- ``query.share`` reply: ``served-users``, ``local-counts`` (|I_local| per served user: the
  FedAvg weights the server would see anyway), ``share-users`` / ``share-items`` (the node's
  I_share, the only interactions that ever leave a client), and the catalogue size.
- ``train`` message: ``item-table`` (V_s) and the round's sampled users of this node; reply:
  ``item-table`` (weighted mean of the uploaded tables), ``row-weight``, ``num-examples``, and
  with ``fru-alpha`` > 0 ``fru-users`` / ``fru-bytes``: the size of each trained user's FRU
  store, which stays on the node.
- ``evaluate`` message: ``item-table`` and the part to score; reply: metric means and
  ``num-examples`` (users scored), so Flower's weighted average gives the global mean.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord

from fedshare.federated.population import NodeUpdate

TABLE = "item-table"
ROW_WEIGHT = "row-weight"
WEIGHT = "num-examples"
FRU_USERS, FRU_BYTES = "fru-users", "fru-bytes"  # train replies with fru-alpha > 0


def table_record(table: torch.Tensor) -> ArrayRecord:
    return ArrayRecord({TABLE: Array(table.detach().numpy().astype(np.float32))})


def table_from(record: ArrayRecord) -> torch.Tensor:
    return torch.from_numpy(record[TABLE].numpy().copy())


def update_records(update: NodeUpdate) -> tuple[ArrayRecord, MetricRecord]:
    arrays = ArrayRecord({TABLE: Array(update.table.numpy().astype(np.float32)),
                          ROW_WEIGHT: Array(update.row_weight.numpy().astype(np.float32))})
    return arrays, MetricRecord({WEIGHT: float(update.weight), "num-users": update.num_users})


def update_from(arrays: ArrayRecord, metrics: MetricRecord) -> NodeUpdate:
    return NodeUpdate(torch.from_numpy(arrays[TABLE].numpy().copy()), float(metrics[WEIGHT]),
                      torch.from_numpy(arrays[ROW_WEIGHT].numpy().copy()),
                      int(metrics["num-users"]))


def int_array(values: np.ndarray) -> Array:
    return Array(np.ascontiguousarray(values, dtype=np.int64))
