"""Settings of the unlearning phase, apart from the code that uses them: the ClientApp reads
them from the run config without importing the server's graph code (and PyG with it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fedshare.errors import FedShareError


@dataclass(frozen=True)
class UnlearningConfig:
    """Settings of the unlearning phase.

    Args:
        rounds: T_un. steps: server updates per round. lr: their Adam learning rate.
        tau: temperature of Eq. 25. bpr: add BPR on the updated G_s to L_CU.
        forgotten_graph, remaining_fl: off for the Table IV ablations.
        include_self: keep the item's own (layer-0) term in its forgotten views.
        positive_in_denominator: InfoNCE's usual softmax form of Eq. 25.
        weight: weight of L_CU beside BPR.
        local_epochs: local epochs of the remaining-data rounds (the learning phase uses
            more): like FedEraser's and FRU's calibration rounds, a fraction of the learning
            epochs; measured on ML-100K it keeps the unlearned model's quality at a fraction
            of the time, because the forgotten data are shared data clients never trained on.
        reset_orphans: not in the paper (the ``fedshare-reset`` variant): before the phase's
            rounds, the rows of forgotten items left with no edge in the updated G_s go back
            to their initial values (regenerated from the run's seed: no bytes kept), as if
            the server had never trained them; the remaining-data rounds then learn them again
            from whatever local data clients hold.
    """

    rounds: int = 20
    steps: int = 10
    lr: float = 3e-2
    tau: float = 0.5
    bpr: bool = True
    forgotten_graph: bool = True
    remaining_fl: bool = True
    include_self: bool = True
    positive_in_denominator: bool = False
    weight: float = 0.1
    local_epochs: int = 1
    reset_orphans: bool = False

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.steps < 0 or self.tau <= 0 or self.lr <= 0 \
                or self.local_epochs < 1:
            raise FedShareError("unlearning needs rounds >= 1, steps >= 0, tau > 0, lr > 0, "
                                "local_epochs >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


VARIANTS: dict[str, dict[str, bool]] = {
    "fedshare": {},
    "wo-forgotten-graph": {"forgotten_graph": False},
    "wo-remaining-fl": {"remaining_fl": False},
    "fedshare-reset": {"reset_orphans": True},
}
"""FedShare's unlearning (Algorithm 2), its Table IV ablations, and the named variant that
departs from the paper (``fedshare-reset``), as overrides of :class:`UnlearningConfig`."""
