"""FedAvg of a sequence model over training devices, in process (issue 17).

One device = one session (CAU paper Sec. 5.1: a session is one user's time-ordered history). A
round samples training devices with :func:`fedshare.federated.rounds.sample_users` (seeded per
round); each sampled device copies the global parameters, trains on its own session's window
(:meth:`SequenceData.windows`: the last ``max_len + 1`` items, as the centralised reference) and
uploads its parameters; the server averages them weighted by |D_u|, the number of prediction
points of that window (FedAvg's n_k; ``min(n, max_len + 1) - 1``).

Choices:

- Local optimiser: Adam (the spec's "Adam lr 1e-3, batch 256"; the CAU paper trains its backbones
  with Adam and says nothing of a federated optimiser). A device is stateless between rounds, so a
  *fresh* optimiser is made for each device in each round; ``optimizer="sgd"`` is the alternative.
  One session is one window, i.e. one batch, so a local epoch is one step.
- Randomness: a device's dropout stream is seeded by (run seed, round, session) alone, so a device
  trains the same whichever cohort serves it; this is what makes cohort and one-node-per-device
  rounds give the same model (to float rounding of the weighted means).
- Devices are trained one by one on one working model (the global vector copied in with
  :func:`load_vector`), not vmapped: per-device dropout streams and GRU4Rec's ``nn.GRU``
  do not batch over parameter sets under ``torch.func.vmap``.
- A cohort's reply is a :class:`NodeUpdate` whose ``table`` is the flat parameter vector
  (``parameters_to_vector``): the weighted mean of its devices' vectors and the summed weight, so
  the server's Eq. 16 (:func:`fedshare.federated.aggregation.aggregate`, mode ``eq16``) over node
  replies equals FedAvg over devices.
- Validation and test devices evaluate the global model on their own sessions
  (:func:`metric_sums`: every prefix -> next item, full ranking); the server adds the sums.
  :func:`run_federated` keeps the best-validation global model (as :func:`train_central` does)
  and reports test metrics of that model.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.nn.utils import parameters_to_vector

from fedshare.errors import FedShareError
from fedshare.federated.aggregation import aggregate
from fedshare.federated.population import NodeUpdate
from fedshare.federated.rounds import LearningRound, RunLog, sample_users
from fedshare.federated.traffic import FLOAT, Traffic
from fedshare.sequences.config import SequenceConfig
from fedshare.sequences.data import PAD, TEST, TRAIN, VALID, SequenceData, pad_sessions
from fedshare.sequences.evaluate import KS, metric_sums
from fedshare.sequences.models import GRU4Rec, SASRec, SequenceModel
from fedshare.sequences.train import next_item_loss


def make_backbone(backbone: str, num_items: int, max_len: int = 50, dim: int = 64,
                  dropout: float = 0.2) -> SequenceModel:
    """``sasrec`` or ``gru4rec`` with the spec's sizes (``dim`` 64)."""
    if backbone == "sasrec":
        return SASRec(num_items, max_len=max_len, dim=dim, dropout=dropout)
    if backbone == "gru4rec":
        return GRU4Rec(num_items, dim=dim, dropout=dropout)
    raise ValueError(f"unknown backbone {backbone!r} (sasrec, gru4rec)")


@dataclass(frozen=True)
class LocalConfig:
    """A device's local training: ``epochs`` passes (= steps) over its window; ``batched``:
    a node's devices in one batch (one SGD step only: :class:`SequenceConfig`)."""

    epochs: int = 1
    lr: float = 1e-3
    optimizer: str = "adam"
    batched: bool = False

    def make(self, params) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr)
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr)
        raise ValueError(f"unknown optimizer {self.optimizer!r} (adam, sgd)")


def device_seed(seed: int, round_: int, session: int) -> int:
    """The dropout seed of one device in one round (independent of who serves it)."""
    return int(np.random.default_rng([seed, round_, session, 0x5E0]).integers(2 ** 62))


def prediction_points(window: np.ndarray) -> int:
    """|D_u|: positions of a left-padded window with a non-empty prefix and a real target."""
    real = np.asarray(window) != PAD
    return int((real[:-1] & real[1:]).sum())


def load_vector(model: SequenceModel, vector: Tensor) -> None:
    """Copy ``vector`` into ``model``'s parameters. (``vector_to_parameters`` would make the
    parameters *views* of ``vector``, so training would write into the global vector.)"""
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(vector[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
    if offset != vector.numel():
        raise ValueError(f"vector of {vector.numel()} values for {offset} parameters")


def train_device(model: SequenceModel, start: Tensor, window: Tensor, local: LocalConfig,
                 seed: int) -> Tensor:
    """The device's parameter vector after local training of ``model`` loaded with ``start``
    on its ``[L + 1]`` window (a fresh optimiser; dropout seeded by ``seed``); a ``[B, L + 1]``
    batch of windows trains on their points' mean loss (``LocalConfig.batched``)."""
    load_vector(model, start)
    model.train()
    optimizer = local.make(model.parameters())
    batch = window if window.dim() == 2 else window.unsqueeze(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(local.epochs):
            loss = next_item_loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return parameters_to_vector(model.parameters()).detach()


class SequenceCohort:
    """The devices (sessions) one node serves, of any part, and a working copy of the model.

    Args:
        data: the sessions.
        sessions: the session ids this node serves.
        model: a model of the run's architecture (only its structure is used; a copy is kept).
        local: the devices' local training.
        seed: the run seed (dropout streams, see :func:`device_seed`).
    """

    def __init__(self, data: SequenceData, sessions: Sequence[int], model: SequenceModel,
                 local: LocalConfig, seed: int) -> None:
        self.sessions = np.sort(np.asarray(sessions, dtype=np.int64))
        self.part = data.part[self.sessions]
        self.windows = torch.from_numpy(pad_sessions(
            [data.session(int(s)) for s in self.sessions], data.max_len + 1))
        self.weights = np.array([prediction_points(w) for w in self.windows.numpy()],
                                dtype=np.int64)
        self._row = {int(s): k for k, s in enumerate(self.sessions)}
        self.model = copy.deepcopy(model)
        self.local, self.seed = local, seed

    def train(self, start: Tensor, sampled: np.ndarray, round_: int) -> NodeUpdate:
        """Train the sampled training devices this node serves from ``start``; the reply is
        the |D_u|-weighted mean of their vectors and the summed |D_u|."""
        rows = [self._row[int(s)] for s in sampled if int(s) in self._row]
        rows = [k for k in rows if self.part[k] == TRAIN and self.weights[k] > 0]
        total = float(self.weights[rows].sum()) if rows else 0.0
        if not rows:
            return NodeUpdate(start.clone(), 0.0, torch.zeros(1), 0)
        if self.local.batched:
            seed = device_seed(self.seed, round_, int(self.sessions[rows[0]]))
            mean = train_device(self.model, start, self.windows[rows], self.local, seed)
            return NodeUpdate(mean, total, torch.full((1,), total), len(rows))
        acc = torch.zeros_like(start, dtype=torch.float64)
        for k in rows:
            vector = train_device(self.model, start, self.windows[k], self.local,
                                  device_seed(self.seed, round_, int(self.sessions[k])))
            acc += float(self.weights[k]) * vector.double()
        mean = (acc / total).to(start.dtype)
        return NodeUpdate(mean, total, torch.full((1,), total), len(rows))

    def evaluate(self, vector: Tensor, part: int, ks: tuple[int, ...] = KS
                 ) -> tuple[dict[str, float], int]:
        """Sums of Recall/NDCG@k of the global model over this node's devices of ``part``."""
        load_vector(self.model, vector)
        windows = self.windows[torch.from_numpy(self.part == part)]
        return metric_sums(self.model, windows, ks)


class SequenceServer:
    """The global sequence model as a flat vector, averaged by FedAvg (a :class:`GlobalModel`
    for :class:`LearningRound`: no server-side client).

    ``server_optimizer="adam"`` is FedAdam (Reddi et al., "Adaptive Federated Optimization",
    ICLR 2021): the FedAvg step ``avg - global`` is treated as a negative gradient and applied
    by a server-side Adam (``server_lr``; betas 0.9 / 0.99 and eps 1e-3, that paper's
    defaults). Why it is offered: with a fresh optimiser on every device and one step per local
    epoch, plain FedAvg of sequence models learns slowly (README, "Sequence models").

    ``server_betas`` and ``server_eps`` override those defaults. Why: with one local SGD step of
    lr 1 (E = 1) the weighted average step is exactly the minibatch gradient of the sampled
    devices' windows, so betas (0.9, 0.999) and eps 1e-8 make FedAdam the centralised
    reference's Adam on that minibatch; eps 1e-3 instead damps every coordinate whose
    pseudo-gradient is below 1e-3 (most item-embedding rows).
    """

    def __init__(self, model: SequenceModel, server_optimizer: str = "fedavg",
                 server_lr: float = 1e-2, server_betas: tuple[float, float] = (0.9, 0.99),
                 server_eps: float = 1e-3) -> None:
        if server_optimizer not in ("fedavg", "adam"):
            raise FedShareError(f"unknown server optimizer {server_optimizer!r}; "
                                "fedavg or adam")
        self.model = model
        self.table = parameters_to_vector(model.parameters()).detach().clone()
        self.adam: torch.optim.Adam | None = None
        if server_optimizer == "adam":
            self.weights = torch.nn.Parameter(self.table.clone())
            self.adam = torch.optim.Adam([self.weights], lr=server_lr, betas=server_betas,
                                         eps=server_eps)

    def server_client_update(self, round_: int) -> NodeUpdate | None:
        return None

    def aggregate(self, updates: Sequence[NodeUpdate]) -> Tensor:
        return aggregate(self.table, updates, "eq16")

    def finish_round(self, local_view: Tensor, round_: int) -> Tensor:
        if self.adam is None:
            self.table = local_view.detach().clone()
        else:  # FedAdam: the averaged step is the negative pseudo-gradient
            self.weights.grad = (self.table - local_view).detach().clone()
            self.adam.step()
            self.table = self.weights.detach().clone()
        load_vector(self.model, self.table)
        return self.table

    def restore(self, vector: Tensor) -> None:
        """Make ``vector`` (a kept global model, e.g. the best-validation one) the model as it
        is: no server step (FedAdam's :meth:`finish_round` would move it by one more step)."""
        self.table = vector.detach().clone()
        if self.adam is not None:
            with torch.no_grad():
                self.weights.copy_(self.table)
        load_vector(self.model, self.table)


def add_sums(replies: Sequence[tuple[dict[str, float], int]]) -> dict[str, float]:
    """Metrics from the nodes' sums: sum of sums over sum of counts."""
    count = sum(c for _, c in replies)
    names = replies[0][0].keys() if replies else ()
    return {n: sum(s[n] for s, _ in replies) / max(count, 1) for n in names}


@dataclass
class FederatedResult:
    """What :func:`run_federated` did."""

    model: SequenceModel
    log: pd.DataFrame
    valid: list[dict] = field(default_factory=list)
    best_round: int = 0
    best_valid: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    round_seconds: list[float] = field(default_factory=list)
    traffic: Traffic = field(default_factory=Traffic)


def split_cohorts(sessions: np.ndarray, nodes: int) -> list[np.ndarray]:
    """``nodes`` cohorts of about equal size (session ids dealt round-robin)."""
    sessions = np.asarray(sessions, dtype=np.int64)
    return [sessions[k::nodes] for k in range(max(1, min(nodes, len(sessions))))]


def run_federated(data: SequenceData, backbone: str | SequenceModel = "sasrec",
                  rounds: int = 100, fraction: float = 0.1, local_epochs: int = 1,
                  lr: float = 1e-3, seed: int = 0, eval_every: int = 10, *, dim: int = 64,
                  nodes: int = 1, optimizer: str = "adam", metric: str = "recall@10",
                  progress: Callable[[dict], None] | None = None,
                  server_optimizer: str = "fedavg", server_lr: float = 1e-2,
                  dropout: float = 0.2, server_betas: tuple[float, float] = (0.9, 0.99),
                  server_eps: float = 1e-3, batched: bool = False) -> FederatedResult:
    """FedAvg over the training devices for ``rounds`` rounds (see the module docstring).

    Validation every ``eval_every`` rounds and after the last; the returned model holds the
    best-validation global parameters (round 0 = the initial model if never validated better),
    tested on the test devices. ``nodes`` cohorts serve all sessions (of every part).
    ``result.traffic`` counts the training messages as if every device were its own node
    (:mod:`fedshare.federated.traffic`); validation and test messages are not counted.
    """
    torch.manual_seed(seed)
    model = (make_backbone(backbone, data.num_items, data.max_len, dim, dropout)
             if isinstance(backbone, str) else backbone)
    local = LocalConfig(local_epochs, lr, optimizer, batched)
    cohorts = [SequenceCohort(data, part, model, local, seed)
               for part in split_cohorts(np.arange(data.num_sessions), nodes)]
    server = SequenceServer(model, server_optimizer, server_lr, server_betas, server_eps)
    log = RunLog()
    learning = LearningRound(server, log=log)
    candidates = np.flatnonzero(data.part == TRAIN)
    result = FederatedResult(model, pd.DataFrame())
    best = server.table.clone()
    points = np.array([prediction_points(w) for w in data.windows()], dtype=np.int64)
    vector = FLOAT * server.table.numel()
    for round_ in range(1, rounds + 1):
        started = time.perf_counter()
        sampled = sample_users(candidates, fraction, seed, round_)
        updates = [c.train(server.table, sampled, round_) for c in cohorts]
        # one message per trained device: the global vector down, its vector and |D_u| up
        result.traffic.per_device(sampled[points[sampled] > 0], vector, vector + FLOAT)
        train_seconds = time.perf_counter() - started
        learning(round_, updates, train_seconds)
        result.round_seconds.append(time.perf_counter() - started)
        if round_ % eval_every == 0 or round_ == rounds:
            valid = add_sums([c.evaluate(server.table, VALID) for c in cohorts])
            log.validation(round_, valid)
            row = {"round": round_, **valid}
            result.valid.append(row)
            if progress is not None:
                progress(row)
            if not result.best_valid or valid[metric] > result.best_valid[metric]:
                result.best_round, result.best_valid = round_, valid
                best = server.table.clone()
    server.restore(best)
    result.test = add_sums([c.evaluate(server.table, TEST) for c in cohorts])
    result.log = log.frame()
    return result


def train_with(config: SequenceConfig, data: SequenceData, *, seed: int | None = None,
               start: SequenceModel | None = None, rounds: int | None = None, nodes: int = 1,
               progress: Callable[[dict], None] | None = None) -> FederatedResult:
    """:func:`run_federated` with a run's :class:`SequenceConfig` (the one settings type of
    the family: Flower runs, in-process runs and ``fedshare cau-table`` all use it); ``seed``,
    ``start`` (default: the seed's initial model) and ``rounds`` override the config's."""
    return run_federated(
        data, config.backbone if start is None else start, rounds or config.rounds,
        config.fraction, config.local_epochs, config.lr,
        config.seed if seed is None else seed, config.eval_every, dim=config.dim, nodes=nodes,
        optimizer=config.optimizer, progress=progress,
        server_optimizer=config.server_optimizer, server_lr=config.server_lr,
        dropout=config.dropout, server_betas=(config.server_beta1, config.server_beta2),
        server_eps=config.server_eps, batched=config.batched)
