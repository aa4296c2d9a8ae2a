"""The FedShare ClientApp (Message API): one node serves one user or a cohort of users.

Which users a node serves comes from its node config (``device-file`` on a deployed device,
``user-id``, or ``partition-id`` and ``num-partitions`` in simulation); the round's sampled users
arrive in each train message. A cohort trains all of them in one call of the batched local
trainer and replies with the FedAvg mean and weight, which averages to exactly what per-user
nodes would give (Eq. 16). User embeddings never leave the node: they live in the node's
``context.state`` across rounds, and, when the node has a state directory (node config
``state-dir``, or run config ``client-state-dir``), in a file there too, tagged with the server
store's run key, so a device continues where it was when a stopped run is resumed.

With run config ``defence`` naming ``secagg``, a learning round's train message arrives as
``train.secagg`` between SecAgg+'s other stages (:mod:`clients.secagg`): the node trains the same
way and sends its update masked, so the server learns only the round's sum. With ``hidden`` the
server asks every user of the node and each decides itself whether it trains
(:func:`fedshare.defences.self_sampled`); ``non-marking`` and ``ldp`` rewrite each user's upload
before the node averages them (:func:`fedshare.defences.defend_upload`). The sequence
family's handlers (:mod:`clients.sequence`) are registered on the same app under their own
message types (``query.sequence_devices``, ``train.sequence``, ``evaluate.sequence``).
"""

from __future__ import annotations

import secrets
from dataclasses import replace
from logging import WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.common import log

from clients import secagg, sequence, sequence_unlearning
from fedshare import protocol
from fedshare.atomic import write_atomically
from fedshare.defences import self_sampled
from fedshare.federated.population import ClientPopulation, NodeUpdate
from fedshare.models.local import LocalUpdate
from fedshare.runconfig import (
    DEVICE_FILE,
    data_key,
    federated_config,
    fru_settings,
    load_data,
    load_remaining,
    node_label,
    node_users,
    unlearning_method,
    upload_defence,
)

torch.set_num_threads(1)  # one CPU per virtual node on a small machine
app = ClientApp()
STATE = "fedshare-client"  # the users' embeddings now
HISTORY = "fedshare-history"  # round -> the embeddings before this node trained in it
UNSHARED = "fedshare-unshared"
SECRET = "fedshare-device-secret"
RESTORED = "fedshare-restored"


def _unshared(context: Context) -> bool:
    return UNSHARED in context.state and bool(context.state[UNSHARED]["done"])


def _state_file(context: Context) -> Path | None:
    directory = context.node_config.get("state-dir") or context.run_config.get(
        "client-state-dir")
    return Path(str(directory)) / f"{node_label(context.node_config)}.npz" if directory else None


def _restore(context: Context, mark: protocol.RunMark) -> None:
    """Bring back the node's saved state once per run, if it belongs to this run, as it was
    after the server's last committed round.

    A server that stopped after its last commit runs the later rounds again, and the node may
    have trained in some of them (every remaining-data round of an unlearning phase is
    committed only at its end): it goes back to the embeddings from before the first of them,
    so no round is trained twice and the resumed run ends where an uninterrupted one ends.
    """
    path = _state_file(context)
    if RESTORED in context.state or not mark.key or path is None:
        return
    context.state[RESTORED] = ConfigRecord({"done": True})
    if not path.exists():
        return
    try:
        with np.load(path, allow_pickle=False) as saved:
            if str(saved["run-key"]) != mark.key:
                return
            unshared = bool(saved["unshared"])
            embeddings, history = None, {}
            if "user-embeddings" in saved.files:
                embeddings = saved["user-embeddings"].copy()
                history = dict(zip(saved["history-rounds"].tolist(), saved["history"].copy(),
                                   strict=True))
    except Exception as exc:  # a damaged file: start afresh rather than fail every message
        log(WARNING, "ignored the unreadable client state %s: %s", path, exc)
        return
    later = sorted(r for r in history if r > mark.committed)
    if later and mark.committed >= 0:  # rounds the server did not commit: undo them
        embeddings = history[later[0]]
        history = {r: h for r, h in history.items() if r <= mark.committed}
    if embeddings is not None:
        context.state[STATE] = ArrayRecord({"user-embeddings": Array(embeddings)})
        context.state[HISTORY] = ArrayRecord({str(r): Array(h) for r, h in history.items()})
    if unshared:
        context.state[UNSHARED] = ConfigRecord({"done": True})


def _persist(context: Context, mark: protocol.RunMark) -> None:
    """Write the node's state file: the unshared flag, the embeddings and, for the rounds the
    server has not committed yet, the embeddings from before each; never half a file."""
    path = _state_file(context)
    if path is None or not mark.key:
        return
    state = {"run-key": np.array(mark.key), "unshared": np.array(_unshared(context))}
    if STATE in context.state:
        history = context.state[HISTORY]
        rounds = sorted(int(r) for r in history)
        embeddings = context.state[STATE]["user-embeddings"].numpy()
        state |= {"user-embeddings": embeddings, "history-rounds": np.array(rounds, np.int64),
                  "history": np.stack([history[str(r)].numpy() for r in rounds]) if rounds
                  else np.empty((0, *embeddings.shape), embeddings.dtype)}
    write_atomically(path, lambda out: np.savez(out, **state))


def device_secret(context: Context) -> int:
    """The device's secret (:mod:`fedshare.defences`): a deployed device (node config
    ``device-file``) draws 63 random bits once and keeps them in its state directory, or, with
    none, in the node state for the SuperNode's lifetime; the server never sees them, so it
    cannot recompute the device's self-sampling, decoys, noise or PDC-FRS reports from the
    (public) run seed. Simulated nodes use 0: reproducible, and the engines agree."""
    if DEVICE_FILE not in context.node_config:
        return 0
    if SECRET in context.state:
        return int(context.state[SECRET]["value"])
    directory = context.node_config.get("state-dir") or context.run_config.get(
        "client-state-dir")
    path = Path(str(directory)) / f"{node_label(context.node_config)}.secret" if directory \
        else None
    value = None
    if path is not None and path.exists():
        try:
            value = int(path.read_text().strip())
        except ValueError:
            log(WARNING, "ignored the unreadable device secret %s", path)
    if value is None:
        value = secrets.randbits(63) or 1
        if path is not None:
            write_atomically(path, lambda out: out.write(str(value).encode()))
    context.state[SECRET] = ConfigRecord({"value": value})
    return value


def _population(context: Context, mark: protocol.RunMark | None = None) -> ClientPopulation:
    """This node's users and data, with the private embeddings restored from the node state.

    Once the node has sent its unsharing requests, its users hold only their remaining data.
    """
    if mark is not None:
        _restore(context, mark)
    key = data_key(context.run_config, context.node_config)
    data = load_remaining(key) if _unshared(context) else load_data(key)
    config = federated_config(context.run_config)
    users = node_users(context.node_config, data.num_users)
    population = ClientPopulation(data, users, config.dim, config.seed, shares=config.shares,
                                  local=config.local, pdc=config.pdc,
                                  secret=device_secret(context))
    if STATE in context.state:
        population.embeddings = torch.from_numpy(
            context.state[STATE]["user-embeddings"].numpy().copy())
    return population


def _save(population: ClientPopulation, context: Context, mark: protocol.RunMark, round_: int,
          previous: np.ndarray) -> None:
    """Keep the trained embeddings, and those from before round ``round_`` until the server
    has committed it."""
    history = context.state[HISTORY] if HISTORY in context.state else ArrayRecord()
    kept = ArrayRecord({r: a for r, a in history.items() if mark.committed < int(r) < round_})
    kept[str(round_)] = Array(previous)
    context.state[HISTORY] = kept
    context.state[STATE] = ArrayRecord({"user-embeddings": Array(population.embeddings.numpy())})
    _persist(context, mark)


@app.query("share")
def share(msg: Message, context: Context) -> Message:
    """Upload this node's I_share (and nothing of I_local) and describe its users; with
    variant ``pdc-frs`` the items are perturbed here first (:mod:`fedshare.federated.pdc`)."""
    population = _population(context)
    users, items = population.shared_interactions()
    return protocol.share_reply(msg, population.users, population.local_count(population.users),
                                users, items, (population.num_users, population.num_items))


@app.query("unshare")
def unshare(msg: Message, context: Context) -> Message:
    """Send this node's users' unsharing requests (I_unlearn, a subset of what they shared) and
    from now on keep only the remaining data (the unshared interactions count nowhere, Eq. 9)."""
    mark = protocol.run_mark(msg)
    _restore(context, mark)
    data = load_data(data_key(context.run_config, context.node_config))
    users = node_users(context.node_config, data.num_users)
    train = data.split.train
    mine = data.plan.unlearn & np.isin(train.users, users)
    context.state[UNSHARED] = ConfigRecord({"done": True})
    _persist(context, mark)
    return protocol.unshare_reply(msg, train.users[mine], train.items[mine])


@app.query("restart")
def restart(msg: Message, context: Context) -> Message:
    """Retrain (``unlearning=retrain``): the node's users start over from their initial
    embeddings; the learning rounds that follow train them again on the remaining data."""
    mark = protocol.run_mark(msg)
    _restore(context, mark)
    for key in (STATE, HISTORY):
        if key in context.state:
            del context.state[key]
    _persist(context, mark)
    return protocol.restart_reply(msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training of the round's sampled users of this node (Eq. 12-15)."""
    return protocol.train_reply(msg, *_train(protocol.read_train_request(msg), context))


def secagg_train(msg: Message, context: Context) -> Message:
    """A SecAgg+ round's train message: the same training, its update sent masked
    (:func:`clients.secagg.masked_train`)."""
    return secagg.masked_train(msg, context, lambda request: _train(request, context)[0])


def _train(request: protocol.TrainRequest, context: Context
           ) -> tuple[NodeUpdate, dict[int, int], ArrayRecord | None]:
    """Train the request's users; the update, the FRU store sizes and the extra arrays of
    the reply (FRU's stored rows in a replay, CUFRU's sparse updates)."""
    population = _population(context, request.mark)
    previous = population.embeddings.numpy().copy()
    config = federated_config(context.run_config)
    local = config.local
    if request.local_epochs is not None:  # the unlearning phase's remaining-data rounds
        local = replace(local, epochs=request.local_epochs)
    settings = fru_settings(context.run_config)
    kept: dict[int, int] = {}
    sparse: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    sharers = set(population.sharers().tolist())

    def keep_fru_rows(trained: LocalUpdate, weights: torch.Tensor) -> None:
        from fedshare.unlearning.fru_selection import stored_rows  # only FRU runs import it

        positives, history = population.user_items(trained.users)
        for user, items, rows in stored_rows(trained, request.table, positives, history,
                                             settings, config.seed, request.round):
            kept[user] = _keep(context, user, request.round, items, rows)

    def send_sharer_updates(trained: LocalUpdate, weights: torch.Tensor) -> None:
        for b, user in enumerate(trained.users.tolist()):  # CUFRU's station needs them whole
            mine = trained.row_user == b
            if user in sharers and bool(mine.any()):
                items = trained.row_item[mine]
                sparse.append((user, items, trained.row_value[mine] - request.table[items]))

    learning = request.local_epochs is None  # not the unlearning phase's rounds
    observe = None
    if learning and settings is not None:
        observe = keep_fru_rows
    elif learning and unlearning_method(context.run_config) == "cufru":
        observe = send_sharer_updates
    defence = upload_defence(context.run_config)
    users = request.users
    if defence.hidden:  # the server asked every user: each device decides for itself
        users = self_sampled(users, config.fraction, config.seed, request.round,
                             population.secret)
    update = population.train(users, request.table, local, config.seed, request.round,
                              observe, defence)
    _save(population, context, request.mark, request.round, previous)
    extra = protocol.sparse_updates_record(sparse) if sparse else None
    if request.replay is not None:  # FRU's calibration round: the stored rows come along
        extra = protocol.stored_rows_record(*_stored_rows(context, request.replay,
                                                          request.table.shape[1]))
    return update, kept, extra


@app.query("fru_rows")
def fru_rows(msg: Message, context: Context) -> Message:
    """FRU's first replayed round: the node's stored rows of the asked round, weighted."""
    request = protocol.read_stored_rows_request(msg)
    dim = federated_config(context.run_config).dim
    return protocol.stored_rows_reply(msg, *_stored_rows(context, request, dim))


def _stored_rows(context: Context, request: protocol.StoredRowsRequest, dim: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sum_u w_u row_u`` and ``sum_u w_u`` per item over the asked users' FRU stores of the
    asked round (a user with nothing stored for it adds nothing)."""
    items, sums, weights = [], [], []
    for user, weight in zip(request.users.tolist(), request.weights.tolist(), strict=True):
        key = f"fru-{user}"
        record = context.state.get(key, None)
        if record is None or f"{request.round}-items" not in record:
            continue
        mine = torch.from_numpy(record[f"{request.round}-items"].numpy().astype(np.int64))
        rows = torch.from_numpy(record[f"{request.round}-rows"].numpy().copy())
        items.append(mine)
        sums.append(rows * weight)
        weights.append(torch.full((len(mine),), float(weight)))
    if not items:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dim), torch.zeros(0)
    all_items = torch.cat(items)
    unique, position = torch.unique(all_items, return_inverse=True)
    summed = torch.zeros(len(unique), dim).index_add_(0, position, torch.cat(sums))
    weight = torch.zeros(len(unique)).index_add_(0, position, torch.cat(weights))
    return unique, summed, weight


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
    population = _population(context, request.mark)
    return protocol.evaluate_reply(msg, {
        part: population.evaluate(population.users, request.table, part)
        for part in request.parts})


# SecAgg+'s stages, then the sequence family (run config ``family = "sequence"``): same app,
# their own message types.
def _action(message_type: str) -> str:
    return message_type.split(".", 1)[1]


app.train(_action(protocol.SECAGG_TRAIN))(secagg_train)
app.query(_action(protocol.SECAGG_SETUP))(secagg.setup)
app.query(_action(protocol.SECAGG_SHARE_KEYS))(secagg.share_keys)
app.query(_action(protocol.SECAGG_UNMASK))(secagg.unmask)
app.query(_action(protocol.SEQ_DEVICES))(sequence.devices)
app.train(_action(protocol.SEQ_TRAIN))(sequence.train)
app.evaluate(_action(protocol.SEQ_EVALUATE))(sequence.evaluate)
app.query(_action(protocol.SEQ_REQUESTS))(sequence_unlearning.requests)
app.query(_action(protocol.SEQ_CAU_SCORES))(sequence_unlearning.scores)
app.train(_action(protocol.SEQ_CAU_STEP))(sequence_unlearning.step)
app.train(_action(protocol.SEQ_CAU_LOCAL))(sequence_unlearning.local)
app.evaluate(_action(protocol.SEQ_FORGET))(sequence_unlearning.forget)
