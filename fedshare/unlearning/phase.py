"""Running the unlearning methods from one learned federation (in process).

Every method starts from a deep copy of the same learned state (server and clients), receives
the same unsharing requests through :class:`SharedStore` and is timed from the requests to a
usable model:

- ``no-unlearning``: the data are deleted from D_s / G_s, the model is left as it is;
- ``fedshare`` (Algorithm 2) and its ablations ``wo-forgotten-graph``, ``wo-remaining-fl``;
- ``fru`` and ``cufru``: roll back and calibrated replay from client-side update histories
  (:mod:`fedshare.unlearning.fru`) or a server-side transfer station
  (:mod:`fedshare.unlearning.cufru`), both recorded during learning (``learn(record=True)``);
- ``retrain``: the whole learning phase from scratch on the remaining data, same config.

Bytes kept to unlearn are read from the run's storage ledger: the M snapshots for FedShare's
methods, every FRU or CUFRU store for those, nothing for no-unlearning and Retrain.

After a FedShare phase the snapshots taken before the requests are deleted and the store drops
the pending interactions: no server store holds a forgotten interaction (a test checks it).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace

import numpy as np

from fedshare.data.prepared import PreparedData
from fedshare.errors import FedShareError
from fedshare.federated.config import FederatedConfig
from fedshare.federated.inprocess import InProcessFederation, run_inprocess
from fedshare.federated.population import ClientPopulation
from fedshare.federated.traffic import Traffic, stored_rows_bytes
from fedshare.storage_ledger import SERVER, StorageLedger
from fedshare.unlearning import cufru
from fedshare.unlearning import fru as fru_method
from fedshare.unlearning.algorithm import complete_erasure, run_algorithm2
from fedshare.unlearning.config import VARIANTS, UnlearningConfig
from fedshare.unlearning.fru import FruHistory, FruSettings
from fedshare.unlearning.remaining import remaining_data
from fedshare.unlearning.replay import ReplayConfig
from fedshare.unlearning.shared_store import SharedStore

METHODS = ("no-unlearning", "fedshare", "wo-forgotten-graph", "wo-remaining-fl",
           "fedshare-reset", "fru", "cufru", "retrain")
FEDSHARE_METHODS = tuple(VARIANTS)
KEPT_KINDS = {**{m: ("snapshots",) for m in FEDSHARE_METHODS}, "fru": fru_method.KINDS,
              "cufru": cufru.KINDS}


@dataclass
class UnlearningOutcome:
    """A method's unlearned federation, its wall time and the bytes it kept to unlearn
    (in total and on the clients; the rest is on the server)."""

    method: str
    federation: InProcessFederation
    seconds: float
    kept_bytes: int
    store: SharedStore | None = None
    client_bytes: int = 0
    traffic: Traffic = field(default_factory=Traffic)

    @property
    def server_bytes(self) -> int:
        return self.kept_bytes - self.client_bytes


def kept_bytes(ledger: StorageLedger, method: str) -> tuple[int, int]:
    """(total, on clients) bytes the method's stores hold, from the ledger."""
    kinds = KEPT_KINDS.get(method, ())
    server = sum(ledger.held(SERVER, kind) for kind in kinds)
    total = sum(ledger.held(kind=kind) for kind in kinds)
    return total, total - server


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
    config = federation.config
    population = ClientPopulation(remaining, old.users, config.dim, config.seed,
                                  shares=config.shares, local=config.local)
    population.embeddings = old.embeddings.clone()
    federation.population = population
    federation.data = remaining


def unlearn(learned: InProcessFederation, data: PreparedData, method: str,
            config: UnlearningConfig, round_offset: int,
            replay: ReplayConfig | None = None) -> UnlearningOutcome:
    """Apply ``method`` to a copy of ``learned`` (which holds ``data``, requests included)."""
    if method not in METHODS:
        raise FedShareError(f"unknown unlearning method {method!r}; one of {', '.join(METHODS)}")
    traffic = Traffic()
    if method == "retrain":  # timed like the others: training only, no evaluation inside
        # every device is told to drop its model (a message to each), then learning again
        traffic.per_device(np.arange(data.num_users), 0, 0)
        start = time.perf_counter()
        result = run_inprocess(remaining_data(data), learned.config, validate=False,
                               traffic=traffic)
        assert result.federation is not None
        return UnlearningOutcome(method, result.federation, time.perf_counter() - start, 0,
                                 traffic=traffic)
    if method in ("fru", "cufru"):
        if method not in learned.histories:
            raise FedShareError(f"{method} needs the history recorded while learning "
                                "(learn with record=True)")
        if learned.config.variant == "fedshare-fedavg":
            raise FedShareError(f"{method} replays refinement variants, not fedshare-fedavg")
    federation = copy.deepcopy(learned)
    federation.traffic = traffic
    server = federation.server
    kept, on_clients = kept_bytes(federation.ledger, method)
    start = time.perf_counter()
    store = SharedStore(server.shared)
    issue_requests(data, store)
    server.set_shared(store.interactions())  # Eq. 19-20
    switch_to_remaining(federation, data)
    replay = replay or ReplayConfig()
    if method == "no-unlearning":
        complete_erasure(server, store)
    elif method == "fru":
        fru_method.fru_unlearn(federation, learned.histories["fru"], replay, round_offset)
        complete_erasure(server, store)
    elif method == "cufru":
        leaving = set(np.unique(store.forgotten().users).tolist())
        cufru.cufru_unlearn(federation, learned.histories["cufru"], leaving, replay,
                            round_offset)
        complete_erasure(server, store)
    else:
        run_algorithm2(server, store, replace(config, **VARIANTS[method]), round_offset,
                       lambda r: federation.train_round(r, config.local_epochs))
    seconds = time.perf_counter() - start
    federation.traffic = None
    if method == "fru":  # the stored rows each participant sends back in each replayed round
        fru_uploads(learned.histories["fru"], traffic, server.table.shape[1])
    return UnlearningOutcome(method, federation, seconds, kept, store, on_clients, traffic)


def fru_uploads(history: FruHistory, traffic: Traffic, dim: int) -> None:
    """FRU's replay asks every participant of every replayed round for its stored rows of that
    round: a message of its own in the first round (which trains nothing), part of the train
    reply in the others (whose request and update :meth:`InProcessFederation.fresh_update`
    counted)."""
    for k, round_ in enumerate(history.replayed_rounds()):
        participants = history.rounds.get(round_)
        if participants is None:
            continue
        for user in participants[0].tolist():
            store = history.clients_.get(user)
            record = store.get(round_) if store is not None else None
            rows = 0 if record is None else len(record[0])
            traffic.add([user], 0, stored_rows_bytes(rows, dim), messages=int(k == 0))


def learn(data: PreparedData, config: FederatedConfig, record: bool = False,
          fru: FruSettings | None = None) -> InProcessFederation:
    """The learning phase; ``record`` keeps the FRU and CUFRU histories (``fru``: what FRU's
    participants store, default :class:`FruSettings`: the paper's settings)."""
    recorders = (FruHistory(fru or FruSettings()), cufru.TransferStation()) if record else ()
    result = run_inprocess(data, config, recorders=recorders)
    assert result.federation is not None
    return result.federation
