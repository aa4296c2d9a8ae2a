"""``summary.json``: one schema for a run, whichever engine ran it.

Both engines (the in-process engine through ``fedshare run --engine inprocess``, the Flower
ServerApp) write a :class:`RunSummary`; fields an engine has no use for keep their defaults
(``nodes`` is ``None`` in process: no Flower node took part). A run with an unlearning phase adds
a :class:`PhaseSummary`, whose fields sit beside the run's at the top level of the file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class PhaseSummary:
    """The unlearning phase: scores before it, its wall time from the requests to the
    unlearned model, the bytes kept to unlearn (M snapshots, or FRU's / CUFRU's stores), what
    it served, the method, and what it cost on the wire
    (:class:`fedshare.federated.traffic.Traffic`)."""

    learned_valid: dict[str, float]
    learned_test: dict[str, float]
    unlearning_seconds: float
    unlearning_kept_bytes: int
    unshare_requests: int
    forgotten_interactions: int
    unlearning: dict
    unlearning_method: str = "fedshare"
    client_messages: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    devices_online: int = 0


@dataclass
class RunSummary:
    variant: str
    rounds: int
    engine: str
    valid: dict[str, float]
    test: dict[str, float]
    seconds: float
    shared_interactions: int
    snapshot_bytes: int
    snapshots: int
    fru_client_bytes: int = 0
    nodes: int | None = None
    rejected_replies: list[dict] = field(default_factory=list)
    resumed_from_round: int = 0
    phase: PhaseSummary | None = None
    # CDCGNNFed's graph mending of the server's current D_s (graph_mending.MendStats), else None
    mending: dict | None = None

    def to_dict(self) -> dict:
        summary = asdict(self)
        phase = summary.pop("phase")
        return {**summary, **(phase or {})}
