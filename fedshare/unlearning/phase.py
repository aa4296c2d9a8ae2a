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
from dataclasses import dataclass, replace

import numpy as np

from fedshare.data.prepared import PreparedData
from fedshare.federated.config import FederatedConfig
from fedshare.federated.population import ClientPopulation
from fedshare.federated.simulate import InProcessFederation, simulate
from fedshare.unlearning.algorithm import complete_erasure, run_algorithm2
from fedshare.unlearning.contrastive import UnlearningConfig
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
    if method == "no-unlearning":
        complete_erasure(server, store)
    else:
        ablation = {"fedshare": {}, "wo-forgotten-graph": {"forgotten_graph": False},
                    "wo-remaining-fl": {"remaining_fl": False}}[method]
        run_algorithm2(server, store, replace(config, **ablation), round_offset,
                       federation.train_round)
    return UnlearningOutcome(method, federation, time.perf_counter() - start, kept, store)


def learn(data: PreparedData, config: FederatedConfig) -> InProcessFederation:
    result = simulate(data, config)
    assert result.federation is not None
    return result.federation
