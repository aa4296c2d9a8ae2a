"""The in-process engine: the learning phase in one process, every sampled user trained in one
batched call.

This is the vectorised reference of the Flower app (``strategies/``, ``clients/``): the same
client code, the same round (:class:`fedshare.federated.rounds.LearningRound`) and server code,
without messages. It is what tuning and tests run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from fedshare.data.interactions import Interactions
from fedshare.data.prepared import PreparedData
from fedshare.defences import UploadDefence, self_sampled
from fedshare.federated.config import FederatedConfig
from fedshare.federated.population import ClientPopulation, NodeUpdate
from fedshare.federated.recording import RoundRecorder
from fedshare.federated.rounds import LearningRound, RunLog, is_eval_round, sample_users
from fedshare.federated.server import Server
from fedshare.federated.traffic import Traffic, table_bytes, update_bytes
from fedshare.models.local import LocalTrainConfig, LocalUpdate
from fedshare.storage_ledger import StorageLedger


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
        progress: called with each validation row.
        traffic: where client messages are counted, one per trained user and round (an
            unlearning method's cost, :mod:`fedshare.federated.traffic`); ``None``: not counted.
        defence: the devices' upload defence (:mod:`fedshare.defences`); ``None`` is the
            undefended research fast path. ``secagg`` changes nothing here: the engine sums
            the round's uploads in one step, which is what a secure sum reveals.
    """

    def __init__(self, data: PreparedData, config: FederatedConfig,
                 recorders: tuple[RoundRecorder, ...] = (),
                 progress: Callable[[dict], None] | None = None,
                 traffic: Traffic | None = None, defence: UploadDefence | None = None) -> None:
        self.data = data
        self.defence = defence
        self.traffic = traffic
        self.config = config
        self.population = ClientPopulation(data, np.arange(data.num_users), config.dim,
                                           config.seed, shares=config.shares, local=config.local,
                                           pdc=config.pdc)
        shared = data.plan.shared_data(data.split.train)
        if not config.shares:
            shared = shared.subset(np.zeros(len(shared), bool))
        if config.pdc is not None:  # PDC-FRS: D_s is what the devices report, perturbed
            shared = Interactions.from_arrays(*self.population.shared_interactions(),
                                              data.num_users, data.num_items)
        self.ledger = StorageLedger()
        self.server = Server(shared, config, self.ledger)
        self.recorders = recorders
        self.histories: dict[str, RoundRecorder] = {}
        for recorder in recorders:
            recorder.begin(self.ledger, *self.server.checkpoint(), np.unique(shared.users))
        for recorder in recorders:
            recorder.serving(self.population, config.seed)
        self.candidates = self.population.trainable()
        self.log = RunLog(progress)
        self.learning = LearningRound(self.server, recorders, self.log)

    def client_updates(self, round_: int, epochs: int | None = None) -> list[NodeUpdate]:
        """Sample round ``round_``'s users and train them locally (Eq. 12-15) in one batched
        call (``epochs``: other than the configured local epochs)."""
        cfg = self.config
        local = cfg.local if epochs is None else replace(cfg.local, epochs=epochs)
        users = self.round_users(round_)
        start = self.server.table

        def observe(update: LocalUpdate, weights: torch.Tensor) -> None:
            for recorder in self.recorders:
                recorder.clients(round_, update, weights, start)

        observer = observe if self.recorders else None
        return [self.fresh_update(users, start, local, round_, observer)]

    def round_users(self, round_: int) -> np.ndarray:
        """Who trains in ``round_``: the server's sample (Sec. IV-B1), or with the ``hidden``
        defence the devices' own draws."""
        cfg = self.config
        if self.defence is not None and self.defence.hidden:
            return self_sampled(self.candidates, cfg.fraction, cfg.seed, round_)
        return sample_users(self.candidates, cfg.fraction, cfg.seed, round_)

    def fresh_update(self, users: np.ndarray, table: torch.Tensor, local: LocalTrainConfig,
                     round_: int, observe: Callable[[LocalUpdate, torch.Tensor], None] | None
                     = None) -> NodeUpdate:
        """``users`` train from ``table``, each answering one train message (counted in
        :attr:`traffic`)."""
        update = self.population.train(users, table, local, self.config.seed, round_, observe,
                                       self.defence)
        if self.traffic is not None:
            num_items, dim = table.shape
            self.traffic.per_device(users, table_bytes(num_items, dim),
                                    update_bytes(num_items, dim))
        return update

    def train_round(self, round_: int, epochs: int | None = None) -> torch.Tensor:
        """Clients' updates aggregated (Eq. 16): the round's local view (unlearning's
        remaining-data rounds)."""
        return self.learning.local_view(round_, self.client_updates(round_, epochs))[0]

    def round(self, round_: int) -> None:
        """One round of Algorithm 1."""
        started = time.perf_counter()
        updates = self.client_updates(round_)
        self.learning(round_, updates, time.perf_counter() - started)

    def stop_recording(self) -> None:
        """Learning is over: later rounds (unlearning's) are not part of the history."""
        self.histories = {r.name: r for r in self.recorders}
        self.recorders = ()
        self.learning.hooks = ()

    def evaluate(self, part: str) -> dict[str, float]:
        everyone = np.arange(self.data.num_users)
        return _means(*self.population.evaluate(everyone, self.server.table, part))


def run_inprocess(data: PreparedData, config: FederatedConfig,
                  progress: Callable[[dict], None] | None = None,
                  recorders: tuple[RoundRecorder, ...] = (), validate: bool = True,
                  traffic: Traffic | None = None, defence: UploadDefence | None = None
                  ) -> RunResult:
    """Run ``config.rounds`` rounds of Algorithm 1, validating on the schedule the Flower app
    follows (:func:`fedshare.federated.rounds.is_eval_round`) and scoring the final table.

    ``validate=False`` runs the rounds only (no validation, no final scores: ``valid`` and
    ``test`` stay empty), so that Retrain, timed as an unlearning method, does the same kind
    of work as every other method's timed region.
    """
    start_time = time.perf_counter()
    federation = InProcessFederation(data, config, recorders, progress, traffic, defence)
    for round_ in range(1, config.rounds + 1):
        federation.round(round_)
        if validate and is_eval_round(round_, config):
            federation.log.validation(round_, federation.evaluate("valid"))
    federation.stop_recording()
    result = RunResult(config.to_dict(), federation.log.validations, federation.log.rounds)
    if validate:
        result.valid = federation.evaluate("valid")
        result.test = federation.evaluate("test")
    result.seconds = time.perf_counter() - start_time
    result.table = federation.server.table.clone()
    result.federation = federation
    return result
