"""What a federated sequence run reports (``summary.json``), in both engines, and its progress line.

One schema for the Flower app and the in-process engine, so their runs compare key by key; the
test scores are those of the best-validation global model (``best_round``), which is also the
model the run saves (``model.npy``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class SequenceSummary:
    """A sequence run's outcome.

    ``devices``: training, validation and test devices (sessions) by part. ``traffic``: per
    message kind (``train``, ``evaluate``), client messages and array bytes each way
    (:class:`fedshare.federated.traffic.Traffic`); Flower runs only (``None`` in process).
    ``unlearning``: with ``unlearn = true``, the method, the requests received and served,
    the forget samples, the unlearning's seconds and traffic, and the scores (test
    Recall/NDCG, Hit_u, U-score) of the learned (``original``) and ``unlearned`` models.
    """

    engine: str
    backbone: str
    rounds: int
    best_round: int
    valid: dict[str, float]
    test: dict[str, float]
    seconds: float
    devices: dict[str, int]
    model_size: int
    nodes: int | None = None
    traffic: dict[str, dict[str, int]] | None = None
    rejected_replies: list[dict] = field(default_factory=list)
    family: str = "sequence"
    unlearning: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def progress_line(round_: int, seconds: float, valid: dict[str, float]) -> str:
    """The line both engines print for a validation."""
    return (f"round {round_}  {seconds:.1f} s  valid Recall@10 {valid['recall@10']:.4f}  "
            f"NDCG@10 {valid['ndcg@10']:.4f}")
