"""Settings of a federated run, as one flat mapping (Flower run-config keys use dashes).

Defaults are the values chosen on the ML-100K validation split (see README, "Federated
learning"); the faithful configuration of the paper is ``aggregation = "eq16"``,
``server-lr = 1``, ``local-epochs = 1``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from fedshare.errors import FedShareError
from fedshare.federated.pdc import PdcSettings
from fedshare.models.local import LocalTrainConfig

VARIANTS = ("fedshare", "wo-cl", "wo-bpr", "fedshare-fedavg", "no-sharing")
VARIANTS += ("cdcgnnfed",)  # learning baseline (fedshare.federated.graph_mending)
AGGREGATIONS = ("eq16", "touched")
VARIANTS += ("pdc-frs",)  # learning baseline (fedshare.federated.pdc)


@dataclass(frozen=True)
class FederatedConfig:
    """Every knob of the learning phase.

    Args:
        variant: ``fedshare`` (Eq. 18), ``wo-cl`` (lambda1 = 0), ``wo-bpr`` (contrastive term
            only), ``fedshare-fedavg`` (the server is one more client holding D_s, averaged in by
            |D_s|), ``no-sharing`` (every interaction stays local; no server training),
            ``cdcgnnfed`` (Eq. 18 on G_s mended by predicted edges,
            :mod:`fedshare.federated.graph_mending`).
        rounds: communication rounds T.
        fraction: fraction of users sampled per round (Sec. IV-B1).
        aggregation: ``eq16`` averages full tables (Eq. 16, literal); ``touched`` averages each
            row over the sampled users whose update touched it.
        server_lr: step on the aggregated update, ``V <- V + server_lr * (avg - V)``; 1 = Eq. 16.
        local_epochs, local_lr, local_reg, num_negatives, local_batch_size: Eq. 15 training.
        server_steps: refinement steps per round (Eq. 18).
        server_refine_lr: Adam learning rate of the refinement.
        server_batch_size: shared edges per BPR batch and items per InfoNCE batch.
        tau: InfoNCE temperature (Eq. 17). lambda1: weight of InfoNCE. reg: lambda of Eq. 18.
        num_layers: server LightGCN depth L.
        snapshots: M, how many past global tables the server keeps for unlearning.
        pdc_epsilon, pdc_augment, pdc_weight: variant ``pdc-frs``, the PDC-FRS baseline
            (:mod:`fedshare.federated.pdc`): shared items are perturbed on the device by the
            exponential mechanism with epsilon ``pdc_epsilon`` per item (1 by default, the
            usual strong-privacy budget: a report moves the odds between any two real items at
            most e-fold; ``fedshare pdc-sweep`` measures others), the server refines like
            ``wo-cl`` on them and adds ``pdc_weight`` of that step to the aggregate, and each
            sampled user adds ``pdc_augment`` positives.
        dim: embedding size d. seed: every draw. eval_every: validation period in rounds.
        mend_drop, mend_threshold, mend_ratio, mend_epochs: CDCGNNFed's graph mending
            (:class:`fedshare.federated.graph_mending.MendSettings`); other variants ignore
            them.
    """

    variant: str = "fedshare"
    rounds: int = 100
    fraction: float = 0.1
    aggregation: str = "touched"
    server_lr: float = 1.0
    local_epochs: int = 5
    local_lr: float = 0.5
    local_reg: float = 1e-4
    num_negatives: int = 1
    local_batch_size: int = 0
    server_steps: int = 10
    server_refine_lr: float = 5e-3
    server_batch_size: int = 2048
    tau: float = 0.5
    lambda1: float = 0.5
    reg: float = 1e-4
    num_layers: int = 3
    snapshots: int = 5
    pdc_epsilon: float = 1.0  # PDC-FRS (variant "pdc-frs"; fedshare/federated/pdc.py)
    pdc_augment: int = 5
    pdc_weight: float = 0.01
    dim: int = 32
    seed: int = 0
    eval_every: int = 10
    mend_drop: float = 0.1
    mend_threshold: float = 0.9
    mend_ratio: float = 0.1
    mend_epochs: int = 20

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise FedShareError(f"unknown variant {self.variant!r}; choose one of "
                                f"{', '.join(VARIANTS)}")
        if self.aggregation not in AGGREGATIONS:
            raise FedShareError(f"unknown aggregation {self.aggregation!r}; choose one of "
                                f"{', '.join(AGGREGATIONS)}")
        if not 0.0 < self.fraction <= 1.0:
            raise FedShareError(f"fraction must lie in (0, 1], got {self.fraction}")
        for name in ("rounds", "local_epochs", "num_negatives", "server_batch_size", "dim",
                     "eval_every"):
            if getattr(self, name) < 1:
                raise FedShareError(f"{name.replace('_', '-')} must be >= 1")
        for name in ("server_steps", "local_batch_size", "snapshots", "num_layers"):
            if getattr(self, name) < 0:
                raise FedShareError(f"{name.replace('_', '-')} must be >= 0")
        PdcSettings(self.pdc_epsilon, self.pdc_augment, self.pdc_weight)  # checks them
        if self.tau <= 0:
            raise FedShareError("tau must be > 0")
        self._check_mending()

    def _check_mending(self) -> None:
        """CDCGNNFed's settings (checked for every variant: a typo fails early)."""
        if not 0.0 <= self.mend_drop < 1.0:
            raise FedShareError(f"mend-drop must lie in [0, 1), got {self.mend_drop}")
        if not 0.0 < self.mend_threshold < 1.0:
            raise FedShareError(f"mend-threshold must lie in (0, 1), got {self.mend_threshold}")
        if not 0.0 <= self.mend_ratio < float("inf"):
            raise FedShareError(f"mend-ratio must be a finite number >= 0, got "
                                f"{self.mend_ratio}")
        if self.mend_epochs < 1:
            raise FedShareError("mend-epochs must be >= 1")

    @property
    def local(self) -> LocalTrainConfig:
        return LocalTrainConfig(self.local_epochs, self.local_lr, self.local_reg,
                                self.num_negatives, self.local_batch_size or None)

    @property
    def contrastive_weight(self) -> float:
        return 0.0 if self.variant in ("wo-cl", "pdc-frs") else self.lambda1

    @property
    def uses_bpr(self) -> bool:
        return self.variant != "wo-bpr"

    @property
    def shares(self) -> bool:
        return self.variant != "no-sharing"

    @property
    def pdc(self) -> PdcSettings | None:
        """PDC-FRS's settings when the variant is ``pdc-frs``, else ``None``."""
        return PdcSettings(self.pdc_epsilon, self.pdc_augment, self.pdc_weight) \
            if self.variant == "pdc-frs" else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_run_config(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> FederatedConfig:
        """Build from run-config style keys (dashes or underscores); unknown keys are an error."""
        known = {f.name: f.type for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        defaults = cls()
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise FedShareError(f"unknown setting {key!r}")
            default = getattr(defaults, name)
            exact_int = isinstance(default, int) and (
                isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()))
            bool_number = isinstance(default, float) and isinstance(value, bool)
            if exact_int or bool_number or (isinstance(default, str)
                                            and not isinstance(value, str)):
                raise FedShareError(f"setting {key!r} expects {type(default).__name__}, "
                                    f"got {value!r}")
            try:
                kwargs[name] = type(default)(value)
            except (TypeError, ValueError):
                raise FedShareError(f"setting {key!r} expects {type(default).__name__}, "
                                    f"got {value!r}") from None
        return cls(**kwargs)
