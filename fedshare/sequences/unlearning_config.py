"""Settings of sequence unlearning through Flower (run config ``unlearn = true``, family sequence).

Read from the flat run config like :class:`fedshare.sequences.config.SequenceConfig`, with keys
of their own (``seq-unlearning``, ``seq-request-fraction``, ``seq-cau-*``,
``seq-continued-rounds``). The CAU defaults are :class:`CAUSettings`' (batch 16, Adam lr 1e-3,
the paper's epochs per backbone, Sec. 5.1.4): ``seq-cau-epochs = 0`` means "the paper's".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from fedshare.errors import FedShareError
from fedshare.sequences.config import OPTIMIZERS, typed_value
from fedshare.sequences.unlearning_methods import (
    ABLATIONS,
    CAU_VARIANTS,
    CAUSettings,
    method_config,
)
from fedshare.unlearning.cau.unlearn import CAUConfig

JOINT = (*CAU_VARIANTS, *ABLATIONS)
"""Methods run in the joint form (the server schedules and steps; devices send gradients)."""
FLOWER_METHODS = (*JOINT, "cau-local", "retrain", "fedavg-remaining")
RUN_KEYS = {"seq-unlearning": "method", "seq-request-fraction": "request_fraction",
            "seq-cau-epochs": "epochs", "seq-cau-batch-size": "batch_size",
            "seq-cau-lr": "lr", "seq-cau-optimizer": "optimizer",
            "seq-continued-rounds": "continued_rounds"}


@dataclass(frozen=True)
class SequenceUnlearning:
    """What to unlearn and how.

    Args:
        method: one of :data:`FLOWER_METHODS` (``fedshare.sequences.unlearning_methods``).
        request_fraction: the share of training devices that request (one position each,
            :func:`fedshare.sequences.requests.sequence_requests`).
        epochs, batch_size, lr, optimizer: CAU's (``epochs`` 0 = the paper's per backbone).
        continued_rounds: ``fedavg-remaining``'s rounds on D_r.
    """

    method: str = "cau-gradient-hard"
    request_fraction: float = 0.1
    epochs: int = 0
    batch_size: int = 16
    lr: float = 1e-3
    optimizer: str = "adam"
    continued_rounds: int = 20

    def __post_init__(self) -> None:
        if self.method not in FLOWER_METHODS:
            raise FedShareError(f"unknown seq-unlearning {self.method!r}; one of "
                                f"{', '.join(FLOWER_METHODS)}")
        if self.optimizer not in OPTIMIZERS:
            raise FedShareError(f"unknown seq-cau-optimizer {self.optimizer!r}; one of "
                                f"{', '.join(OPTIMIZERS)}")
        for key, value in (("seq-cau-batch-size", self.batch_size),
                           ("seq-continued-rounds", self.continued_rounds)):
            if value < 1:
                raise FedShareError(f"{key} must be >= 1, got {value}")
        if self.epochs < 0:
            raise FedShareError(f"seq-cau-epochs must be >= 0 (0: the paper's), got "
                                f"{self.epochs}")
        if not self.lr > 0:
            raise FedShareError(f"seq-cau-lr must be > 0, got {self.lr}")
        if not 0.0 < self.request_fraction <= 1.0:
            raise FedShareError("seq-request-fraction must lie in (0, 1], got "
                                f"{self.request_fraction}")

    @property
    def cau(self) -> CAUSettings:
        return CAUSettings(epochs=self.epochs or None, batch_size=self.batch_size, lr=self.lr,
                           continued_rounds=self.continued_rounds, optimizer=self.optimizer)

    def cau_config(self, backbone: str, seed: int) -> CAUConfig:
        """The method's CAU settings (joint methods and ``cau-local``), as the CAU table's."""
        return method_config(self.method, self.cau.base(backbone, seed))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> SequenceUnlearning:
        """The keys present (others ignored); a bad value is a :class:`FedShareError`."""
        defaults = cls()
        kinds = {f.name: type(getattr(defaults, f.name)) for f in fields(cls)}
        return cls(**{name: typed_value(key, run_config[key], kinds[name])
                      for key, name in RUN_KEYS.items() if key in run_config})
