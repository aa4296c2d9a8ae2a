"""The learning phase in one process: every sampled user trains in one batched call.

This is the vectorised reference of the Flower app (``strategies/``, ``clients/``): the same
client, aggregation and server code, without messages. It is what tuning and tests run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from fedshare.data.prepared import PreparedData
from fedshare.federated.aggregation import aggregate
from fedshare.federated.config import FederatedConfig
from fedshare.federated.population import ClientPopulation
from fedshare.federated.recording import RoundRecorder
from fedshare.federated.server import Server
from fedshare.models.local import LocalUpdate
from fedshare.storage import StorageLedger


def sample_users(candidates: np.ndarray, fraction: float, seed: int, round_: int) -> np.ndarray:
    """The users of round ``round_`` (Sec. IV-B1): a seeded uniform sample without replacement."""
    n = max(1, int(np.ceil(round(fraction * len(candidates), 9))))
    rng = np.random.default_rng([seed, round_, 0x5A3])
    return np.sort(rng.choice(candidates, size=min(n, len(candidates)), replace=False))


@dataclass
class RunResult:
    config: dict
    history: list[dict] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)
    test: dict[str, float] = field(default_factory=dict)
    valid: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    table: torch.Tensor | None = None
    federation: InProcessFederation | None = None


def _means(sums: dict[str, float], n: int) -> dict[str, float]:
    return {k: v / max(n, 1) for k, v in sums.items()}


class InProcessFederation:
    """Server and every client in one process; the state the unlearning phase continues from.

    Args:
        data: split and sharing plan.
        config: the run's settings.
        recorders: learning-phase hooks (the FRU / CUFRU histories); they report their bytes
            to :attr:`ledger`, the one ledger of every store of the run.
    """

    def __init__(self, data: PreparedData, config: FederatedConfig,
                 recorders: tuple[RoundRecorder, ...] = ()) -> None:
        self.data = data
        self.config = config
        shared = data.plan.shared_data(data.split.train)
        if not config.shares:
            shared = shared.subset(np.zeros(len(shared), bool))
        self.ledger = StorageLedger()
        self.server = Server(shared, config, self.ledger)
        self.recorders = recorders
        self.histories: dict[str, RoundRecorder] = {}
        for recorder in recorders:
            recorder.begin(self.ledger, *self.server.checkpoint(), np.unique(shared.users))
        self.population = ClientPopulation(data, np.arange(data.num_users), config.dim,
                                           config.seed, shares=config.shares)
        self.candidates = self.population.trainable()
        self.last_round: dict = {}

    def train_round(self, round_: int, epochs: int | None = None) -> torch.Tensor:
        """Sample, train locally (``epochs``: other than the configured local epochs) and
        aggregate (Eq. 12-16): the round's local view."""
        cfg = self.config
        local = cfg.local if epochs is None else replace(cfg.local, epochs=epochs)
        users = sample_users(self.candidates, cfg.fraction, cfg.seed, round_)
        start = self.server.table

        def observe(update: LocalUpdate, weights: torch.Tensor) -> None:
            for recorder in self.recorders:
                recorder.clients(round_, update, weights, start)

        observer = observe if self.recorders else None
        updates = [self.population.train(users, start, local, cfg.seed, round_, observer)]
        extra = self.server.server_client_update(round_)
        if extra is not None:
            updates.append(extra)
        self.last_round = {"num-users": sum(u.num_users for u in updates),
                           "num-examples": sum(u.weight for u in updates)}
        return aggregate(self.server.table, updates, cfg.aggregation, cfg.server_lr)

    def round(self, round_: int) -> None:
        """One round of Algorithm 1."""
        aggregated = self.train_round(round_)
        table = self.server.finish_round(aggregated, round_)
        for recorder in self.recorders:
            recorder.refined(round_, aggregated, table)

    def stop_recording(self) -> None:
        """Learning is over: later rounds (unlearning's) are not part of the history."""
        self.histories = {r.name: r for r in self.recorders}
        self.recorders = ()

    def evaluate(self, part: str) -> dict[str, float]:
        everyone = np.arange(self.data.num_users)
        return _means(*self.population.evaluate(everyone, self.server.table, part))


def simulate(data: PreparedData, config: FederatedConfig,
             progress: Callable[[dict], None] | None = None,
             recorders: tuple[RoundRecorder, ...] = ()) -> RunResult:
    """Run ``config.rounds`` rounds of Algorithm 1 and evaluate like the Flower app does."""
    start_time = time.perf_counter()
    federation = InProcessFederation(data, config, recorders)
    result = RunResult(config.to_dict())
    for round_ in range(1, config.rounds + 1):
        federation.round(round_)
        result.rounds.append({"round": round_, "seconds": time.perf_counter() - start_time,
                              **federation.last_round})
        if round_ % config.eval_every == 0 or round_ == config.rounds:
            valid = federation.evaluate("valid")
            row = {"round": round_, "seconds": time.perf_counter() - start_time,
                   **{f"valid_{k}": v for k, v in valid.items()}}
            result.history.append(row)
            if progress is not None:
                progress(row)
    federation.stop_recording()
    result.valid = federation.evaluate("valid")
    result.test = federation.evaluate("test")
    result.seconds = time.perf_counter() - start_time
    result.table = federation.server.table.clone()
    result.federation = federation
    return result
