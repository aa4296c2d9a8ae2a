"""The FedShare ClientApp (Message API): one node serves one user or a cohort of users.

Which users a node serves comes from its node config (``device-file`` on a deployed device,
``user-id``, or ``partition-id`` and ``num-partitions`` in simulation); the round's sampled users
arrive in each train message. A cohort trains all of them in one call of the batched local
trainer and replies with the FedAvg mean and weight, which averages to exactly what per-user
nodes would give (Eq. 16). User embeddings never leave the node: they live in the node's
``context.state`` across rounds, and, when the node has a state directory (node config
``state-dir``, or run config ``client-state-dir``), in a file there too, tagged with the server
store's run key, so a device continues where it was when a stopped run is resumed.
"""

from __future__ import annotations

from dataclasses import replace
from logging import WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.common import log

from fedshare import protocol
from fedshare.atomic import write_atomically
from fedshare.federated.population import ClientPopulation
from fedshare.models.local import LocalUpdate
from fedshare.runconfig import (
    data_key,
    federated_config,
    load_data,
    load_remaining,
    node_label,
    node_users,
)

torch.set_num_threads(1)  # one CPU per virtual node on a small machine
app = ClientApp()
STATE = "fedshare-client"
UNSHARED = "fedshare-unshared"


def _unshared(context: Context) -> bool:
    return UNSHARED in context.state and bool(context.state[UNSHARED]["done"])


def _state_file(context: Context) -> Path | None:
    directory = context.node_config.get("state-dir") or context.run_config.get(
        "client-state-dir")
    return Path(str(directory)) / f"{node_label(context.node_config)}.npz" if directory else None


def _restore(context: Context, run_key: str, round_: int | None = None) -> None:
    """Bring back the node's saved state once per run, if it belongs to this run.

    When the server asks again for a round the node already trained (it stopped before
    committing that round), the embeddings from before that round are restored, so the
    round is not trained twice.
    """
    path = _state_file(context)
    if STATE in context.state or not run_key or path is None or not path.exists():
        return
    try:
        with np.load(path, allow_pickle=False) as saved:
            if str(saved["run-key"]) != run_key:
                return
            unshared = bool(saved["unshared"])
            embeddings = None
            if "user-embeddings" in saved.files:
                repeated = round_ is not None and int(saved["round"]) == round_
                embeddings = saved["previous" if repeated else "user-embeddings"].copy()
    except Exception as exc:  # a damaged file: start afresh rather than fail every message
        log(WARNING, "ignored the unreadable client state %s: %s", path, exc)
        return
    if embeddings is not None:
        context.state[STATE] = ArrayRecord({"user-embeddings": Array(embeddings)})
    if unshared:
        context.state[UNSHARED] = ConfigRecord({"done": True})


def _persist(context: Context, run_key: str, trained: tuple[int, np.ndarray] | None = None
             ) -> None:
    """Write the node's state file: the unshared flag, and the embeddings with the round they
    were last trained in and those from before it (``trained``); never half a file."""
    path = _state_file(context)
    if path is None or not run_key:
        return
    state = {"run-key": np.array(run_key), "unshared": np.array(_unshared(context))}
    if STATE in context.state:
        state["user-embeddings"] = context.state[STATE]["user-embeddings"].numpy()
        round_, previous = trained if trained is not None else (-1, state["user-embeddings"])
        state |= {"round": np.array(round_), "previous": previous}
    write_atomically(path, lambda out: np.savez(out, **state))


def _population(context: Context, run_key: str = "", round_: int | None = None
                ) -> ClientPopulation:
    """This node's users and data, with the private embeddings restored from the node state.

    Once the node has sent its unsharing requests, its users hold only their remaining data.
    """
    _restore(context, run_key, round_)
    key = data_key(context.run_config, context.node_config)
    data = load_remaining(key) if _unshared(context) else load_data(key)
    config = federated_config(context.run_config)
    users = node_users(context.node_config, data.num_users)
    population = ClientPopulation(data, users, config.dim, config.seed, shares=config.shares)
    if STATE in context.state:
        population.embeddings = torch.from_numpy(
            context.state[STATE]["user-embeddings"].numpy().copy())
    return population


def _save(population: ClientPopulation, context: Context, run_key: str, round_: int,
          previous: np.ndarray) -> None:
    context.state[STATE] = ArrayRecord({"user-embeddings": Array(population.embeddings.numpy())})
    _persist(context, run_key, (round_, previous))


@app.query("share")
def share(msg: Message, context: Context) -> Message:
    """Upload this node's I_share (and nothing of I_local) and describe its users."""
    population = _population(context)
    users, items = population.shared_interactions()
    return protocol.share_reply(msg, population.users, population.local_count(population.users),
                                users, items, (population.num_users, population.num_items))


@app.query("unshare")
def unshare(msg: Message, context: Context) -> Message:
    """Send this node's users' unsharing requests (I_unlearn, a subset of what they shared) and
    from now on keep only the remaining data (the unshared interactions count nowhere, Eq. 9)."""
    run_key = protocol.run_key(msg)
    _restore(context, run_key)
    data = load_data(data_key(context.run_config, context.node_config))
    users = node_users(context.node_config, data.num_users)
    train = data.split.train
    mine = data.plan.unlearn & np.isin(train.users, users)
    context.state[UNSHARED] = ConfigRecord({"done": True})
    _persist(context, run_key)
    return protocol.unshare_reply(msg, train.users[mine], train.items[mine])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training of the round's sampled users of this node (Eq. 12-15)."""
    request = protocol.read_train_request(msg)
    population = _population(context, request.run_key, request.round)
    previous = population.embeddings.numpy().copy()
    config = federated_config(context.run_config)
    local = config.local
    if request.local_epochs is not None:  # the unlearning phase's remaining-data rounds
        local = replace(local, epochs=request.local_epochs)
    alpha = float(context.run_config.get("fru-alpha", 0.0))
    kept: dict[int, int] = {}

    def keep_fru_rows(trained: LocalUpdate, weights: torch.Tensor) -> None:
        from fedshare.unlearning.fru import important_rows  # only FRU runs pay its imports

        for user, items, rows in important_rows(trained, request.table, alpha):
            kept[user] = _keep(context, user, request.round, items, rows)

    learning = alpha > 0 and request.local_epochs is None  # not the unlearning phase's rounds
    update = population.train(request.users, request.table, local, config.seed, request.round,
                              keep_fru_rows if learning else None)
    _save(population, context, request.run_key, request.round, previous)
    return protocol.train_reply(msg, update, kept)


def _keep(context: Context, user: int, round_: int, items: torch.Tensor,
          rows: torch.Tensor) -> int:
    """FRU's client-side store: the user's kept rows of every round, in the node's state (it
    outlives the ClientApp, which is rebuilt per message). Returns the store's bytes."""
    key = f"fru-{user}"
    record = context.state[key] if key in context.state else ArrayRecord()
    record[f"{round_}-items"] = Array(items.numpy())
    record[f"{round_}-rows"] = Array(rows.numpy().astype(np.float32))
    context.state[key] = record
    return sum(array.numpy().nbytes for array in record.values())


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Rank all items for every served user on each part asked (``valid``, or ``valid`` and
    ``test`` for the final scores) and reply with the metric sums and the user count per part,
    which the server adds up exactly even when parts count different users."""
    request = protocol.read_evaluate_request(msg)
    population = _population(context, request.run_key)
    return protocol.evaluate_reply(msg, {
        part: population.evaluate(population.users, request.table, part)
        for part in request.parts})
