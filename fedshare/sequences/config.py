"""Settings of a federated sequence run, read from a flat run config (Flower's keys use dashes).

The round schedule (``rounds``, ``fraction``, ``eval-every``, ``seed``) is shared with the
LightGCN family: it means the same in both (which devices a round samples, which rounds are
validated). What trains the model has keys of its own, prefixed ``seq-``, because the two
families' good values differ by orders of magnitude (LightGCN's local SGD at lr 0.5 for 5 epochs
would wreck a transformer). Defaults are the best measured federated SASRec setting (README,
"Sequence models": client SGD lr 1.0 for 2 epochs, FedAdam at server lr 0.005).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from fedshare.errors import FedShareError

BACKBONES = ("sasrec", "gru4rec")
OPTIMIZERS = ("sgd", "adam")
SERVER_OPTIMIZERS = ("fedavg", "adam")
SHARED_KEYS = {"rounds": "rounds", "fraction": "fraction", "eval-every": "eval_every",
               "seed": "seed"}
"""Run-config keys both families read (the round schedule), by field name."""
RUN_KEYS = {"seq-data": "data", "seq-backbone": "backbone", "seq-dim": "dim",
            "seq-max-len": "max_len", "seq-local-epochs": "local_epochs", "seq-lr": "lr",
            "seq-optimizer": "optimizer", "seq-server-optimizer": "server_optimizer",
            "seq-server-lr": "server_lr", "seq-server-beta1": "server_beta1",
            "seq-server-beta2": "server_beta2", "seq-server-eps": "server_eps",
            "seq-dropout": "dropout", "seq-batched": "batched"}
"""The sequence family's own run-config keys, by field name."""


@dataclass(frozen=True)
class SequenceConfig:
    """Every knob of a federated sequence run.

    Args:
        data: a folder written by :meth:`SequenceData.save` ("" = prepare ``dataset`` with
            ``max_len`` and ``split-seed``, as the launcher does once per run).
        backbone: ``sasrec`` or ``gru4rec``. dim: embedding size.
        max_len: the model's input length when the sessions are prepared here.
        local_epochs, lr, optimizer: each device's local training (a fresh optimiser a round).
        server_optimizer, server_lr: ``fedavg`` (the average itself) or ``adam`` (FedAdam).
        server_beta1, server_beta2, server_eps: FedAdam's Adam; the defaults make it the
            centralised Adam on the round's sampled batch (README "Sequence models").
        dropout: the backbone's dropout (0 makes every forward deterministic, which the tests
            use to compare runs whose random streams are drawn in different processes).
        rounds, fraction, eval_every, seed: the schedule (shared with LightGCN).
        batched: a node trains its sampled devices in one batch. With one local SGD step
            (``optimizer`` sgd, ``local_epochs`` 1) the |D_u|-weighted mean of the devices'
            vectors *is* one SGD step on the mean loss over all their prediction points
            (``next_item_loss`` is the mean over a window's points, |D_u| their count), so the
            update is FedAvg's; only the dropout masks are drawn for the batch rather than per
            device, so the aggregate then depends on how devices are grouped into nodes
            (equal to the per-device path with dropout 0: tested). About 10x faster a round.
    """

    data: str = ""
    backbone: str = "sasrec"
    dim: int = 64
    max_len: int = 50
    local_epochs: int = 1
    lr: float = 1.0
    optimizer: str = "sgd"
    server_optimizer: str = "adam"
    server_lr: float = 0.005
    server_beta1: float = 0.9
    server_beta2: float = 0.999
    server_eps: float = 1e-8
    dropout: float = 0.2
    rounds: int = 100
    fraction: float = 0.1
    eval_every: int = 10
    seed: int = 0
    batched: bool = False

    def __post_init__(self) -> None:
        for name, allowed in (("backbone", BACKBONES), ("optimizer", OPTIMIZERS),
                              ("server_optimizer", SERVER_OPTIMIZERS)):
            if getattr(self, name) not in allowed:
                raise FedShareError(f"unknown {_key(name)} {getattr(self, name)!r}; one of "
                                    f"{', '.join(allowed)}")
        for name in ("dim", "max_len", "local_epochs", "rounds", "eval_every"):
            if getattr(self, name) < 1:
                raise FedShareError(f"{_key(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "server_lr", "server_eps"):
            if not getattr(self, name) > 0:
                raise FedShareError(f"{_key(name)} must be > 0, got {getattr(self, name)}")
        for name in ("server_beta1", "server_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise FedShareError(f"{_key(name)} must lie in [0, 1), got "
                                    f"{getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise FedShareError(f"seq-dropout must lie in [0, 1), got {self.dropout}")
        if not 0.0 < self.fraction <= 1.0:
            raise FedShareError(f"fraction must lie in (0, 1], got {self.fraction}")
        if self.batched and (self.optimizer != "sgd" or self.local_epochs != 1):
            raise FedShareError("seq-batched needs seq-optimizer sgd and seq-local-epochs 1 "
                                "(one local step: then the batch is exactly FedAvg's update)")

    def is_eval_round(self, round_: int) -> bool:
        """Validation every ``eval_every`` rounds and after the last (as ``run_federated``)."""
        return round_ % self.eval_every == 0 or round_ == self.rounds

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_run_config(self) -> dict[str, Any]:
        """The sequence family's own keys with these values (the shared ones left out)."""
        return {key: getattr(self, name) for key, name in RUN_KEYS.items()}

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> SequenceConfig:
        """Read the shared and ``seq-`` keys present (others are ignored); a value of the
        wrong type or out of range is a :class:`FedShareError`."""
        defaults = cls()
        kinds = {f.name: type(getattr(defaults, f.name)) for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, name in {**SHARED_KEYS, **RUN_KEYS}.items():
            if key in run_config:
                values[name] = typed_value(key, run_config[key], kinds[name])
        return cls(**values)


def _key(name: str) -> str:
    """The run-config key of a field."""
    inverse = {n: k for k, n in {**SHARED_KEYS, **RUN_KEYS}.items()}
    return inverse[name]


def typed_value(key: str, value: Any, kind: type) -> Any:
    """``value`` as ``kind``: ints stay whole, strings stay strings, no bools for numbers,
    only bools for a switch."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise FedShareError(f"setting {key!r} expects true or false, got {value!r}")
    wrong = isinstance(value, bool) or (kind is str) != isinstance(value, str) or (
        kind is int and isinstance(value, float) and not value.is_integer())
    try:
        if not wrong:
            return kind(value)
    except (TypeError, ValueError):
        pass
    raise FedShareError(f"setting {key!r} expects {kind.__name__}, got {value!r}")
