"""The privacy audit of one deployment setting: train, observe as the server does, attack.

For a setting (a defence and how many users one observed reply holds) the audit

1. runs the learning phase with that defence (:class:`InProcessFederation`, the client code
   of every engine), recording what a secure-aggregation server holds of each round (the
   round's sum, and who took part unless participation is ``hidden``) and the seconds per
   round, and scores the final table on the test split (the utility side);
2. lets ``users`` audited users (uniform among users with local data, seeded) answer one more
   round from the learned table with their trained embeddings, and builds what the server
   sees of it: the user's own reply (``group = 1``), the reply of a cohort node of ``group``
   users, or the secure sum of a round's devices (``group = 0``; with ``hidden``
   participation the server does not know which round holds the user, and is given it
   anyway: a conservative choice);
3. runs every attack of :mod:`fedshare.privacy.attacks` on it, the learned one trained on
   replies the server simulates from its own shared users (their shared items play local
   items; the server holds them), and the disaggregation attack on the recorded run when the
   server knows participation, or the correlation attack when it does not;
4. scores each attack per audited user (:mod:`fedshare.privacy.scoring`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from fedshare.data.prepared import PreparedData
from fedshare.defences import UploadDefence, ldp_epsilon, self_sampled
from fedshare.federated.config import FederatedConfig
from fedshare.federated.inprocess import InProcessFederation, _means
from fedshare.federated.population import initial_user_embeddings
from fedshare.federated.rounds import sample_users
from fedshare.privacy.attacks import (
    SINGLE,
    LearnedAttack,
    correlation,
    disaggregation,
    features,
    single_scores,
)
from fedshare.privacy.observations import Replies, single_replies
from fedshare.privacy.scoring import matched_negatives, popularity_bins, score_user

PSEUDO_USERS = 200
"""Shared users whose replies the server simulates to train the learned attack."""


@dataclass(frozen=True)
class AuditSetting:
    """One row of the audit.

    Args:
        name: its label.
        defence: the devices' upload defence.
        group: users per observed reply: 1 (one user per device), k (a cohort node), or 0
            (a secure sum over the round's devices).
    """

    name: str
    defence: UploadDefence
    group: int = 1


@dataclass
class AuditResult:
    scores: pd.DataFrame  # one row per audited user and attack
    utility: dict[str, float]


class _Observer:
    """Builds the server's view of a target's reply (alone, in a cohort, in a round sum)."""

    def __init__(self, replies: Replies, group: int, rng: np.random.Generator) -> None:
        self.replies, self.group, self.rng = replies, group, rng
        self.position = {int(u): k for k, u in enumerate(replies.users)}

    def __call__(self, user: int, size: int) -> tuple[Tensor, Tensor]:
        me = self.position[int(user)]
        others = np.delete(np.arange(len(self.replies.users)), me)
        mates = self.rng.choice(others, min(size - 1, len(others)), replace=False)
        return self.replies.observe(np.concatenate([[me], mates]))


@dataclass
class RecordedRun:
    """A learning phase as a secure-aggregation server saw it: the federation after it, each
    round's participants and sums (weighted delta, row weights, total weight), and the
    clients' mean seconds per round (training and upload defences; the server's refinement
    excluded)."""

    federation: InProcessFederation
    sums: list[tuple[np.ndarray, Tensor, Tensor, float]]
    client_seconds: float

    @property
    def table(self) -> Tensor:
        return self.federation.server.table


def training_key(defence: UploadDefence) -> tuple:
    """Settings with equal keys train identically (``secagg`` changes what the server sees,
    not what it computes), so the audit runs the learning phase once per key."""
    rewriting = tuple(n for n in defence.names if n in ("non-marking", "ldp"))
    if not rewriting:
        return (defence.hidden,)
    return (defence.hidden, rewriting, defence.decoy_rows, defence.ldp_clip, defence.ldp_noise)


def record_run(data: PreparedData, config: FederatedConfig, defence: UploadDefence
               ) -> RecordedRun:
    """The learning phase under ``defence`` (:class:`RecordedRun`)."""
    federation = InProcessFederation(data, config, defence=defence)
    sums, seconds = [], 0.0
    for round_ in range(1, config.rounds + 1):
        start = federation.server.table.clone()
        started = time.perf_counter()
        updates = federation.client_updates(round_)
        seconds += time.perf_counter() - started
        update = updates[0]
        sums.append((federation.round_users(round_),
                     (update.weight * (update.table - start)).float(),
                     update.row_weight.float(), float(update.weight)))
        federation.learning(round_, updates, 0.0)
    return RecordedRun(federation, sums, seconds / config.rounds)


def _pseudo_replies(data: PreparedData, config: FederatedConfig, table: Tensor,
                    defence: UploadDefence, exclude: np.ndarray, rng: np.random.Generator,
                    round_: int) -> tuple[Replies, list[np.ndarray]]:
    """Replies the server simulates: shared users (not audited) whose shared items play the
    local ones, trained one round from their initial embedding and then observed."""
    shared = data.plan.shared_data(data.split.train)
    users, counts = np.unique(shared.users, return_counts=True)
    users = users[(counts >= 5) & ~np.isin(users, exclude)]
    users = rng.choice(users, min(PSEUDO_USERS, len(users)), replace=False)
    order = np.argsort(shared.users, kind="stable")
    items = {int(u): shared.items[order][shared.users[order] == u] for u in users}
    lists = [items[int(u)] for u in users]
    start = initial_user_embeddings(users, data.num_users, config.dim, config.seed)
    _, warm = single_replies(users, lists, lists, start, table, config.local, config.seed + 1,
                             round_)
    replies, _ = single_replies(users, lists, lists, warm, table, config.local, config.seed,
                                round_, defence)
    return replies, lists


def audit_setting(data: PreparedData, config: FederatedConfig, setting: AuditSetting,
                  users: int = 200, seed: int = 0, run: RecordedRun | None = None
                  ) -> AuditResult:
    """Audit one setting (see module docstring); ``run``: its learning phase, when already
    recorded (:func:`record_run` with a defence of the same :func:`training_key`)."""
    rng = np.random.default_rng(seed)
    if run is None:
        run = record_run(data, config, setting.defence)
    federation, sums = run.federation, run.sums
    table = federation.server.table.clone()
    population = federation.population
    utility = {f"test-{k}": v for k, v in
               _means(*population.evaluate(np.arange(data.num_users), table, "test")).items()}
    utility["client-seconds-per-round"] = run.client_seconds

    popularity = np.bincount(data.split.train.items, minlength=data.num_items)
    ranks = pd.Series(popularity).rank(method="average").to_numpy() / len(popularity)
    bins = popularity_bins(popularity)
    candidates = federation.candidates
    audited = rng.choice(candidates, min(users, len(candidates)), replace=False)
    pool = audited if setting.group == 1 else candidates
    observed_round = config.rounds + 1
    local, held = population.user_items(pool)
    rows = population._rows(pool)
    replies, _ = single_replies(pool, local, held, population.embeddings[rows], table,
                                config.local, config.seed, observed_round, setting.defence)
    round_size = max(1, round(config.fraction * len(candidates)))
    size = round_size if setting.group == 0 else setting.group
    observe = _Observer(replies, size, rng)

    pseudo, pseudo_local = _pseudo_replies(data, config, table, setting.defence, audited, rng,
                                           observed_round)
    pseudo_observe = _Observer(pseudo, size, rng)
    x, y = [], []
    for k, user in enumerate(pseudo.users):
        delta, weight = pseudo_observe(int(user), size)
        mine = pseudo_local[k]
        negatives = matched_negatives(mine, mine, bins, rng)
        f = features(delta, weight, ranks, popularity)
        x.append(torch.cat([f[mine], f[negatives]]))
        y.append(torch.cat([torch.ones(len(mine)), torch.zeros(len(negatives))]))
    learned = LearnedAttack(torch.cat(x), torch.cat(y))

    participation, correlated = None, {}
    if setting.group == 0:
        weights = torch.stack([s[2] for s in sums])
        deltas = torch.stack([s[1] for s in sums])
        if setting.defence.hidden:  # the server does not know who took part
            correlated = correlation(weights, deltas, torch.tensor([s[3] for s in sums]))
        else:
            took = np.stack([np.isin(audited, s[0]) for s in sums], 1)
            participation = (took, weights, deltas)
    out = []
    local_of, _ = population.user_items(audited)
    for k, user in enumerate(audited.tolist()):
        delta, weight = observe(user, size)
        scores = single_scores(delta, weight, popularity)
        scores["learned"] = learned(features(delta, weight, ranks, popularity))
        if participation is not None:
            took, weights, deltas = participation
            scores |= disaggregation(weights, deltas, took[k])
        scores |= correlated
        mine = local_of[k]
        interacted = _interacted(data, user)
        negatives = matched_negatives(mine, interacted, bins, rng)
        for attack, score in scores.items():
            out.append({"user": user, "attack": attack, "local-items": len(mine),
                        **score_user(score.numpy(), mine, negatives, interacted)})
    frame = pd.DataFrame(out)
    if "ldp" in setting.defence.names:
        epsilons = [ldp_epsilon(setting.defence.ldp_noise,
                                _participations(federation, config, u), setting.defence.ldp_delta)
                    for u in audited]
        utility["epsilon-mean"] = float(np.mean(epsilons))
        utility["epsilon-max"] = float(np.max(epsilons))
    return AuditResult(frame, utility)


def _interacted(data: PreparedData, user: int) -> np.ndarray:
    """Every item the user interacted with (training, validation, test)."""
    parts = (data.split.train, data.split.valid, data.split.test)
    return np.unique(np.concatenate([p.items[p.users == user] for p in parts]))


def _participations(federation: InProcessFederation, config: FederatedConfig, user: int) -> int:
    """Rounds the user's device uploaded in."""
    defence = federation.defence
    draw = self_sampled if defence is not None and defence.hidden else sample_users
    return sum(int(user in set(draw(federation.candidates, config.fraction, config.seed, r)
                               .tolist())) for r in range(1, config.rounds + 1))


ATTACKS = (*SINGLE, "learned", "disaggregation-weight", "disaggregation-delta",
           "correlation-weight", "correlation-delta")
