"""The learning phase in one process: every sampled user trains in one batched call.

This is the vectorised reference of the Flower app (``strategies/``, ``clients/``): the same
client, aggregation and server code, without messages. It is what tuning and tests run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from fedshare.data.prepared import PreparedData
from fedshare.federated.aggregation import aggregate
from fedshare.federated.config import FederatedConfig
from fedshare.federated.population import ClientPopulation
from fedshare.federated.server import Server


def sample_users(candidates: np.ndarray, fraction: float, seed: int, round_: int) -> np.ndarray:
    """The users of round ``round_`` (Sec. IV-B1): a seeded uniform sample without replacement."""
    n = max(1, int(np.ceil(fraction * len(candidates))))
    rng = np.random.default_rng([seed, round_, 0x5A3])
    return np.sort(rng.choice(candidates, size=min(n, len(candidates)), replace=False))


@dataclass
class RunResult:
    config: dict
    history: list[dict] = field(default_factory=list)
    test: dict[str, float] = field(default_factory=dict)
    valid: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    table: torch.Tensor | None = None


def _means(sums: dict[str, float], n: int) -> dict[str, float]:
    return {k: v / max(n, 1) for k, v in sums.items()}


def simulate(data: PreparedData, config: FederatedConfig,
             progress: Callable[[dict], None] | None = None) -> RunResult:
    """Run ``config.rounds`` rounds of Algorithm 1 and evaluate like the Flower app does."""
    start_time = time.perf_counter()
    shared = data.plan.shared_data(data.split.train)
    server = Server(shared if config.shares else shared.subset(np.zeros(len(shared), bool)),
                    config)
    population = ClientPopulation(data, np.arange(data.num_users), config.dim, config.seed,
                                  shares=config.shares)
    candidates = population.trainable()
    everyone = np.arange(data.num_users)
    result = RunResult(config.to_dict())
    for round_ in range(1, config.rounds + 1):
        users = sample_users(candidates, config.fraction, config.seed, round_)
        updates = [population.train(users, server.table, config.local, config.seed, round_)]
        extra = server.server_client_update(round_)
        if extra is not None:
            updates.append(extra)
        local_view = aggregate(server.table, updates, config.aggregation, config.server_lr)
        server.finish_round(local_view, round_)
        if round_ % config.eval_every == 0 or round_ == config.rounds:
            valid = _means(*population.evaluate(everyone, server.table, "valid"))
            row = {"round": round_, "seconds": time.perf_counter() - start_time,
                   **{f"valid_{k}": v for k, v in valid.items()}}
            result.history.append(row)
            if progress is not None:
                progress(row)
    result.valid = _means(*population.evaluate(everyone, server.table, "valid"))
    result.test = _means(*population.evaluate(everyone, server.table, "test"))
    result.seconds = time.perf_counter() - start_time
    result.table = server.table.clone()
    return result
