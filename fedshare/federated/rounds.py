"""One learning round of Algorithm 1, whatever delivers the clients' updates.

Both engines run rounds through :class:`LearningRound`: the in-process engine
(:mod:`fedshare.federated.inprocess`) hands it the update of one batched client call, the Flower
strategy (``strategies/``) the node replies it accepted. A round is

    accepted updates -> aggregate (Eq. 16) -> server step (Eq. 17-18) -> hooks -> metrics row

and a round with too many failed nodes changes nothing but is still committed and logged. The
model is anything with the :class:`GlobalModel` methods, so a second model family (a sequence
model averaged by FedAvg, unlearned on the clients) uses the same round, schedule, log and
summary. Which users a round samples (:func:`sample_users`) and which rounds are validated
(:func:`is_eval_round`) are decided here once, and so is the progress line both engines print.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import numpy as np
import pandas as pd
from torch import Tensor

from fedshare.federated.config import FederatedConfig
from fedshare.federated.population import NodeUpdate
from fedshare.federated.recording import RoundRecorder
from fedshare.reports import metrics_frame


class GlobalModel(Protocol):
    """What a round needs of the server's model (:class:`fedshare.federated.server.Server`)."""

    table: Tensor

    def server_client_update(self, round_: int) -> NodeUpdate | None:
        """The server's own update when it trains like one more client (else ``None``)."""

    def aggregate(self, updates: Sequence[NodeUpdate]) -> Tensor:
        """The local view from the round's updates (Eq. 16)."""

    def finish_round(self, local_view: Tensor, round_: int) -> Tensor:
        """The server step after aggregation; returns and keeps the new global model."""


def sample_users(candidates: np.ndarray, fraction: float, seed: int, round_: int) -> np.ndarray:
    """The users of round ``round_`` (Sec. IV-B1): a seeded uniform sample without replacement."""
    n = max(1, int(np.ceil(round(fraction * len(candidates), 9))))
    rng = np.random.default_rng([seed, round_, 0x5A3])
    return np.sort(rng.choice(candidates, size=min(n, len(candidates)), replace=False))


def is_eval_round(round_: int, config: FederatedConfig) -> bool:
    """Validation every ``eval_every`` rounds and after the last one."""
    return round_ % config.eval_every == 0 or round_ == config.rounds


PROGRESS = "fedshare-progress"
"""Marks the ServerApp's progress lines in Flower's log; the launcher passes on what follows."""


def progress_line(row: dict) -> str:
    """The line both engines print for a validation row."""
    return (f"round {row['round']}  {row['seconds']:.1f} s  valid HR@20 "
            f"{row['valid_hr@20']:.4f}  NDCG@20 {row['valid_ndcg@20']:.4f}")


class RunLog:
    """The rows of ``metrics.csv``: one per round (who trained, the time of its train phase and
    of its server phase), validation metrics on validated rounds; each validation row is also
    passed to ``progress`` (which prints it with :func:`progress_line`)."""

    def __init__(self, progress: Callable[[dict], None] | None = None) -> None:
        self.started = time.perf_counter()
        self.rounds: list[dict] = []
        self.validations: list[dict] = []
        self.progress = progress

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def round(self, round_: int, updates: Sequence[NodeUpdate], train_seconds: float,
              server_seconds: float, extra: Mapping[str, float] | None = None) -> None:
        """Round ``round_``'s row; ``extra``: columns of the engine's own (SecAgg+'s costs)."""
        self.rounds.append({"round": round_, "seconds": self.elapsed(),
                            "num-users": sum(u.num_users for u in updates),
                            "num-examples": sum(u.weight for u in updates),
                            # sent -> every reply in: messages and local training
                            "train-seconds": train_seconds,
                            # aggregation, the server step (not the durable commit)
                            "server-seconds": server_seconds, **(extra or {})})

    def validation(self, round_: int, valid: dict[str, float]) -> None:
        row = {"round": round_, "seconds": self.elapsed(),
               **{f"valid_{k}": v for k, v in valid.items()}}
        self.validations.append(row)
        if self.progress is not None:
            self.progress(row)

    def frame(self) -> pd.DataFrame:
        return metrics_frame(self.rounds, self.validations)


class LearningRound:
    """Algorithm 1's server side of a round, from the updates the clients sent.

    Args:
        model: the server's model.
        hooks: see the moments of every round (:class:`RoundRecorder`): ``refined`` after the
            server step, ``committed`` once the round is final (the durable commit).
        log: where the round's row goes.
    """

    def __init__(self, model: GlobalModel, hooks: Sequence[RoundRecorder] = (),
                 log: RunLog | None = None) -> None:
        self.model = model
        self.hooks = tuple(hooks)
        self.log = log or RunLog()

    def local_view(self, round_: int, updates: Sequence[NodeUpdate]
                   ) -> tuple[Tensor, list[NodeUpdate]]:
        """The aggregate of Eq. 16, with the server's own update where the variant has one;
        also every update that entered it."""
        entered = list(updates)
        extra = self.model.server_client_update(round_)
        if extra is not None:
            entered.append(extra)
        return self.model.aggregate(entered), entered

    def __call__(self, round_: int, updates: Sequence[NodeUpdate] | None,
                 train_seconds: float = 0.0, extra: Mapping[str, float] | None = None
                 ) -> Tensor:
        """Finish round ``round_``; ``updates`` is ``None`` when the round failed (too many
        nodes gave no accepted reply): the model stays as it was. ``extra``: more columns of
        the round's row. Returns the global model."""
        started = time.perf_counter()
        entered: list[NodeUpdate] = []
        if updates is None:
            table = self.model.table
        else:
            view, entered = self.local_view(round_, updates)
            table = self.model.finish_round(view, round_)
            for hook in self.hooks:
                hook.refined(round_, view, table)
        # the row first: the durable commit keeps it with the round
        self.log.round(round_, entered, train_seconds, time.perf_counter() - started, extra)
        for hook in self.hooks:
            hook.committed(round_, table)
        return table
