"""Running the unlearning methods from one learned federation (in process).

Every method starts from a deep copy of the same learned state (server and clients), receives
the same unsharing requests through :class:`SharedStore` and is timed from the requests to a
usable model:

- ``no-unlearning``: the data are deleted from D_s / G_s, the model is left as it is;
- ``fedshare`` (Algorithm 2) and its ablations ``wo-forgotten-graph``, ``wo-remaining-fl``;
- ``retrain``: the whole learning phase from scratch on the remaining data, same config.

After a FedShare phase the snapshots taken before the requests are deleted and the store drops
the pending interactions: no server store holds a forgotten interaction (a test checks it).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from fedshare.data.prepared import PreparedData
from fedshare.federated.config import FederatedConfig
from fedshare.federated.population import ClientPopulation
from fedshare.federated.simulate import InProcessFederation, simulate
from fedshare.unlearning.contrastive import UnlearningConfig, forgotten_views
from fedshare.unlearning.remaining import remaining_data
from fedshare.unlearning.store import SharedStore

METHODS = ("no-unlearning", "fedshare", "wo-forgotten-graph", "wo-remaining-fl", "retrain")


@dataclass
class UnlearningOutcome:
    """A method's unlearned federation, its wall time and the bytes it kept to unlearn."""

    method: str
    federation: InProcessFederation
    seconds: float
    kept_bytes: int
    store: SharedStore | None = None
    history: list[dict] = field(default_factory=list)


def issue_requests(data: PreparedData, store: SharedStore) -> None:
    """Every unsharing user asks to unshare its I_unlearn (Sec. IV-C)."""
    train, unlearn = data.split.train, data.plan.unlearn
    users, items = train.users[unlearn], train.items[unlearn]
    for user in np.unique(users):
        store.unshare(int(user), items[users == user])


def switch_to_remaining(federation: InProcessFederation, data: PreparedData) -> None:
    """Clients drop their unshared interactions (they no longer count anywhere, Eq. 9)."""
    remaining = remaining_data(data)
    old = federation.population
    population = ClientPopulation(remaining, old.users, federation.config.dim,
                                  federation.config.seed, shares=federation.config.shares)
    population.embeddings = old.embeddings.clone()
    federation.population = population
    federation.data = remaining


def unlearn(learned: InProcessFederation, data: PreparedData, method: str,
            config: UnlearningConfig, round_offset: int) -> UnlearningOutcome:
    """Apply ``method`` to a copy of ``learned`` (which holds ``data``, requests included)."""
    if method == "retrain":
        start = time.perf_counter()
        result = simulate(remaining_data(data), learned.config)
        assert result.federation is not None
        return UnlearningOutcome(method, result.federation, time.perf_counter() - start, 0)
    federation = copy.deepcopy(learned)
    server = federation.server
    kept = 0 if method == "no-unlearning" else server.snapshot_bytes()
    start = time.perf_counter()
    store = SharedStore(server.shared)
    issue_requests(data, store)
    server.set_shared(store.interactions())  # Eq. 19-20
    switch_to_remaining(federation, data)
    history: list[dict] = []
    if method != "no-unlearning":
        cfg = {"fedshare": config,
               "wo-forgotten-graph": UnlearningConfig(**{**config.to_dict(),
                                                        "forgotten_graph": False}),
               "wo-remaining-fl": UnlearningConfig(**{**config.to_dict(),
                                                     "remaining_fl": False})}[method]
        forgotten = store.forgotten()
        views = forgotten_views(list(server.snapshots), server.user.detach(), forgotten,
                                learned.config.num_layers, cfg.forgotten_graph,
                                cfg.include_self)
        has_forgotten = torch.zeros(server.num_items, dtype=torch.bool)
        has_forgotten[torch.from_numpy(np.unique(forgotten.items))] = True
        for r in range(1, cfg.rounds + 1):
            round_ = round_offset + r
            local_view = federation.train_round(round_) if cfg.remaining_fl else server.table
            server.unlearn_round(local_view, round_, views, has_forgotten, cfg.steps, cfg.tau,
                                 cfg.bpr, cfg.lr, cfg.positive_in_denominator, cfg.weight)
        del views
        server.snapshots.clear()  # pre-request snapshots have served (erasure)
        server.snapshots.append(server.table.clone())
    store.erase_pending()
    if method == "no-unlearning":
        server.snapshots.clear()
        server.snapshots.append(server.table.clone())
    return UnlearningOutcome(method, federation, time.perf_counter() - start, kept, store,
                             history)


def learn(data: PreparedData, config: FederatedConfig) -> InProcessFederation:
    result = simulate(data, config)
    assert result.federation is not None
    return result.federation
