"""Server-side aggregation of node replies into the local-view table (Eq. 16).

``eq16`` is the paper's FedAvg over full tables: every sampled user's table enters with weight
|D_u| / sum |D_v|, so an item's update is diluted by the share of participants that did not touch
it (on ML-100K with 10% of users per round, most rows move by a few percent of what their
trainers asked for). ``touched`` averages each row only over the users that touched it, which is
what a strong system needs; ``server_lr`` scales the step from the previous table towards the
average (1 = plain FedAvg). Both options are off in the faithful configuration.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from fedshare.federated.population import NodeUpdate


def aggregate(start: Tensor, updates: Sequence[NodeUpdate], mode: str = "eq16",
              server_lr: float = 1.0) -> Tensor:
    """The new global table from the previous one and the nodes' replies.

    Args:
        start: V_s^(t-1), the table every node started from.
        updates: node replies (weighted mean tables, weights, per-row weights).
        mode: ``eq16`` or ``touched`` (see module docstring).
        server_lr: step size towards the aggregate.
    """
    total = sum(u.weight for u in updates)
    if total == 0:
        return start.clone()
    # sum_u w_u (V_u - V_s), recovered exactly from each node's weighted mean.
    delta = sum(u.weight * (u.table - start) for u in updates if u.weight > 0)
    if mode == "eq16":
        step = delta / total
    elif mode == "touched":
        row_weight = sum(u.row_weight for u in updates)
        step = delta / row_weight.clamp(min=1e-12)[:, None]
        step[row_weight == 0] = 0.0
    else:
        raise ValueError(f"unknown aggregation mode {mode!r}")
    return start + server_lr * step
