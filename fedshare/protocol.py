"""The wire format of the FedShare app: every message type, every record key, every conversion.

The ServerApp (``strategies/``) builds requests and reads replies with the functions below; the
ClientApp (``clients/``) reads requests and builds replies with them; neither imports the other.
This is the one module of the core that imports Flower (an import-linter contract says so).
Readers of replies treat them as untrusted: they raise ``ValueError`` (or the error of a missing
key) on anything malformed, and the caller rejects the reply.

Four messages, each a request from the server and one reply per node (SecAgg+'s are below):

========================  ==================================  =====================================
message type              request                             reply
========================  ==================================  =====================================
``query.share``           nothing                             arrays ``served-users``,
                                                              ``local-counts`` (|I_local| per
                                                              served user: the FedAvg weights the
                                                              server sees anyway), ``share-users``
                                                              / ``share-items`` (the node's
                                                              I_share, Eq. 7, the only
                                                              interactions that ever leave it);
                                                              metrics ``num-users-total``,
                                                              ``num-items`` (the catalogue)
``query.unshare``         config ``run-key``,                 arrays ``unshare-users`` /
                          ``committed-round``
                                                              ``unshare-items`` (I_unlearn,
                                                              Sec. IV-C)
``train``                 arrays ``item-table`` (V_s);        arrays ``item-table`` (weighted
                          config ``server-round``, ``users``  mean of the uploads), ``row-weight``;
                          (the round's sampled users of the   metrics ``num-examples`` (summed
                          node), ``run-key``,                 |D_u|), ``num-users``; with FRU
                          ``committed-round``, optional
                          ``local-epochs`` (unlearning's      (``fru-alpha`` > 0) arrays
                          remaining-data rounds)              ``fru-users`` / ``fru-bytes``: each
                                                              trained user's FRU store size (the
                                                              store stays on the node)
``evaluate``              arrays ``item-table``; config       metrics ``<part>:<metric>`` (the
                          ``parts`` (``valid`` or             metric *summed* over the node's
                          ``valid,test``), ``run-key``,       users) and ``<part>:count`` (how
                          ``committed-round``
                                                              many users), so the server adds
                                                              parts up exactly
========================  ==================================  =====================================

Unlearning by replay (``unlearning=fru|cufru``, :mod:`strategies.replay`) and by retraining
(``unlearning=retrain``) adds:

- ``query.restart`` (Retrain): config ``users``; every node forgets its users' trained
  embeddings and starts over from their initial ones; an empty reply.

- ``query.fru_rows`` (FRU's first replayed round, which trains nothing): config
  ``replay-round``, ``users`` and their learning-time ``weights``; the reply's arrays
  ``fru-items``, ``fru-sums`` (``sum_u w_u row_u`` per item over the node's users' stored rows
  of that round) and ``fru-row-weights`` (``sum_u w_u``).
- ``train`` requests of FRU's later replayed rounds carry the same three config keys and their
  replies the same three arrays beside the fresh update.
- ``train`` replies of a CUFRU run's learning rounds add ``cufru-users``, ``cufru-counts``,
  ``cufru-items``, ``cufru-deltas``: each trained sharer's sparse update, which the server's
  station keeps whole so it can subtract it later.

Secure aggregation (run config ``defence`` naming ``secagg``; SecAgg+ on the Message API, stages
in :mod:`strategies.secagg` and :mod:`clients.secagg`, computations in
:mod:`fedshare.secure_sum`) replaces each ``train`` exchange of the learning rounds and of the
unlearning phase's remaining-data rounds with four; keys, ciphertexts and shares are bytes in
config records:

- ``query.secagg_setup``: config ``server-round`` and the ``secagg-*`` settings; the reply's
  config ``mask-key``, ``share-key`` (the node's two public keys of the round).
- ``query.secagg_share_keys``: config ``nodes`` (the node's neighbourhood, itself included) and
  their ``mask-keys``, ``share-keys``; the reply's config ``destinations``, ``ciphertexts`` (its
  Shamir shares, sealed to each neighbour).
- ``train.secagg``: ``train``'s request plus config ``sources``, ``ciphertexts`` (the shares
  sealed to this node) and ``secagg-scale`` (W, the round's weight bound); the reply's one
  array ``masked-vector`` (int64, modulo ``2**secagg-modulus-bits``): nothing else of the
  update leaves the node.
- ``query.secagg_unmask``: config ``active``, ``dropped`` (neighbours that did and did not send
  a masked vector); the reply's config ``owners``, ``shares`` (shares of the active ones'
  self-mask seeds and of the dropped ones' mask keys).

:func:`message_bytes` sizes these (arrays and config payloads).

Sequence models (run config ``family = "sequence"``, :mod:`strategies.sequence`): a device is one
session and the global model one flat float32 vector (array ``sequence-model``):

- ``query.sequence_devices``: nothing asked; the reply's arrays ``sessions``, ``session-parts``
  (training, validation or test device) and ``session-weights`` (|D_u|, prediction points),
  metrics ``num-items`` and ``max-len`` (the catalogue the model is built for).
- ``train.sequence``: the model, config ``server-round`` and ``sessions`` (the node's sampled
  devices); the reply's ``sequence-model`` is their |D_u|-weighted mean vector, metrics
  ``num-examples`` (summed |D_u|) and ``num-users`` (devices trained).
- ``evaluate.sequence``: the model, config ``parts``; the reply is ``evaluate``'s (metric sums
  and counts per part, counted in prediction points).

Sequence unlearning (run config ``unlearn = true``, :mod:`strategies.sequence_unlearning`); a
node's forget samples are numbered in its own order (sessions ascending, positions ascending):

- ``query.sequence_requests``: the global model at request time (each requesting device keeps
  its frozen reference P_ref from it); the reply's arrays ``sessions``, ``request-counts``,
  ``positions`` and ``session-lengths`` (:class:`RequestReport`). From then on the node's
  requesting devices train on their remaining session only.
- ``query.sequence_cau_scores``: the model; the reply's ``cau-scores`` hold one difficulty per
  forget sample of the node (Eq. 11 or 12).
- ``train.sequence_cau_step``: the model, config ``step`` and ``samples`` (the node's samples in
  the step's batch); the reply's ``task-gradients`` ``[3, P]`` are the sums over them of the
  gradients of l_u, l_n, l_KL (Eq. 9 times the count), metric ``num-examples`` the count.
- ``train.sequence_cau_local``: the model; the reply is ``train.sequence``'s: the
  |D_f,u|-weighted mean of the node's devices' unlearned vectors, ``num-examples`` = their
  forget samples, ``num-users`` = the devices.
- ``evaluate.sequence_forget``: the model; the reply's arrays ``hit_u@1`` ... (one 0/1 per forget
  sample of the node and metric of :data:`HIT_METRICS`).

:func:`array_bytes` sizes any message (the traffic of :mod:`fedshare.federated.traffic`).

Every request after the share round carries the server's :class:`RunMark`: the run key of its
state database (devices tag their saved state with it) and the last round it committed, so a
device whose server was restarted goes back to its state as of that round (the rounds after it
will be run again) and a resumed run ends where an uninterrupted one ends.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from torch import Tensor

from fedshare.errors import FedShareError
from fedshare.federated.directory import ShareReply
from fedshare.federated.population import NodeUpdate
from fedshare.runconfig import SecAggSettings
from fedshare.sequences.data import TEST, VALID
from fedshare.sequences.directory import DeviceReport
from fedshare.sequences.forget_metrics import HIT_METRICS
from fedshare.sequences.request_log import RequestReport

# message types
SHARE, UNSHARE = "query.share", "query.unshare"
TRAIN, EVALUATE = MessageType.TRAIN, MessageType.EVALUATE
# record names inside a RecordDict
ARRAYS, METRICS, CONFIG = "arrays", "metrics", "config"
# config keys of requests
ROUND, USERS, RUN_KEY, COMMITTED, LOCAL_EPOCHS, PARTS = (
    "server-round", "users", "run-key", "committed-round", "local-epochs", "parts")
# share replies
SERVED_USERS, LOCAL_COUNTS, SHARE_USERS, SHARE_ITEMS = (
    "served-users", "local-counts", "share-users", "share-items")
NUM_USERS_TOTAL, NUM_ITEMS = "num-users-total", "num-items"
# unshare replies
UNSHARE_USERS, UNSHARE_ITEMS = "unshare-users", "unshare-items"
# train requests and replies
TABLE, ROW_WEIGHT, WEIGHT, NUM_USERS = "item-table", "row-weight", "num-examples", "num-users"
FRU_USERS, FRU_BYTES = "fru-users", "fru-bytes"
# unlearning by replay (FRU, CUFRU): requests name a replayed round and the users' weights;
# FRU's replies add the stored rows, CUFRU's learning replies each sharer's sparse update
FRU_ROWS = "query.fru_rows"
REPLAY_ROUND, WEIGHTS = "replay-round", "weights"
FRU_ITEMS, FRU_SUMS, FRU_ROW_WEIGHTS = "fru-items", "fru-sums", "fru-row-weights"
CUFRU_USERS, CUFRU_COUNTS, CUFRU_ITEMS, CUFRU_DELTAS = (
    "cufru-users", "cufru-counts", "cufru-items", "cufru-deltas")
# evaluate replies: "<part>:<metric>" sums and "<part>:count"
COUNT = "count"


def _ints(values: np.ndarray | Iterable[int]) -> Array:
    return Array(np.ascontiguousarray(np.asarray(values), dtype=np.int64))


def _table(table: Tensor) -> Array:
    return Array(table.detach().numpy().astype(np.float32))


def _tensor(record: ArrayRecord, key: str) -> Tensor:
    return torch.from_numpy(record[key].numpy().copy())


def _request(node: int, message_type: str, config: Mapping, model: ArrayRecord | None = None
             ) -> Message:
    """A request; ``model`` (the global model) is built once and shared by a round's messages."""
    content = RecordDict({CONFIG: ConfigRecord(dict(config))})
    if model is not None:
        content[ARRAYS] = model
    return Message(content, dst_node_id=node, message_type=message_type)


def _reply(request: Message, arrays: ArrayRecord | None = None,
           metrics: MetricRecord | None = None) -> Message:
    content = RecordDict()
    if arrays is not None:
        content[ARRAYS] = arrays
    if metrics is not None:
        content[METRICS] = metrics
    return Message(content, reply_to=request)


def array_bytes(content: RecordDict) -> int:
    """The bytes of every array a message carries (its traffic,
    :mod:`fedshare.federated.traffic`)."""
    return sum(array.numpy().nbytes for record in content.array_records.values()
               for array in record.values())


def table_record(table: Tensor) -> ArrayRecord:
    """The global model as Flower's strategy loop carries it between rounds."""
    return ArrayRecord({TABLE: _table(table)})


@dataclass(frozen=True)
class RunMark:
    """Where the server's durable state stands: its run key ("" without a state database) and
    its last committed round (-1 when unknown)."""

    key: str = ""
    committed: int = -1

    def config(self) -> dict:
        return {RUN_KEY: self.key, COMMITTED: self.committed}


def run_mark(request: Message) -> RunMark:
    """The :class:`RunMark` a request carries."""
    config = request.content.get(CONFIG, {})
    return RunMark(str(config.get(RUN_KEY, "")), int(config.get(COMMITTED, -1)))


# ------------------------------------------------------------------------------ query.share
def share_request(node: int) -> Message:
    return _request(node, SHARE, {})


def share_reply(request: Message, served: np.ndarray, local_counts: np.ndarray,
                users: np.ndarray, items: np.ndarray, catalogue: tuple[int, int]) -> Message:
    """A node's users, their |I_local| and their I_share (Eq. 7); ``catalogue`` is
    (users, items) of the whole dataset."""
    arrays = ArrayRecord({SERVED_USERS: _ints(served), LOCAL_COUNTS: _ints(local_counts),
                          SHARE_USERS: _ints(users), SHARE_ITEMS: _ints(items)})
    metrics = MetricRecord({NUM_USERS_TOTAL: catalogue[0], NUM_ITEMS: catalogue[1]})
    return _reply(request, arrays, metrics)


def read_share_reply(reply: Message) -> ShareReply:
    arrays, metrics = reply.content[ARRAYS], reply.content[METRICS]
    return ShareReply(reply.metadata.src_node_id, arrays[SERVED_USERS].numpy(),
                      arrays[LOCAL_COUNTS].numpy(), arrays[SHARE_USERS].numpy(),
                      arrays[SHARE_ITEMS].numpy(),
                      (int(metrics[NUM_USERS_TOTAL]), int(metrics[NUM_ITEMS])))


# ---------------------------------------------------------------------------- query.unshare
def unshare_request(node: int, mark: RunMark) -> Message:
    return _request(node, UNSHARE, mark.config())


def unshare_reply(request: Message, users: np.ndarray, items: np.ndarray) -> Message:
    return _reply(request, ArrayRecord({UNSHARE_USERS: _ints(users),
                                        UNSHARE_ITEMS: _ints(items)}))


def read_unshare_reply(content: RecordDict) -> tuple[np.ndarray, np.ndarray]:
    """(users, items) of a node's unsharing requests, one pair per interaction."""
    users = content[ARRAYS][UNSHARE_USERS].numpy()
    items = content[ARRAYS][UNSHARE_ITEMS].numpy()
    if users.shape != items.shape or users.ndim != 1 or users.dtype.kind != "i" \
            or items.dtype.kind != "i":
        raise ValueError("users and items are not two integer vectors of one length")
    return users, items


# ------------------------------------------------------------------------------------ train
@dataclass
class TrainRequest:
    """What a node needs to train: the round, its sampled users, V_s and, in unlearning's
    remaining-data rounds, the local epochs to use instead of the configured ones."""

    round: int
    users: np.ndarray
    table: Tensor
    mark: RunMark
    local_epochs: int | None
    replay: StoredRowsRequest | None = None


def train_requests(round_: int, node_users: Mapping[int, list[int]], table: Tensor,
                   mark: RunMark, local_epochs: int | None = None) -> list[Message]:
    """One train message per node, naming the node's sampled users."""
    model = table_record(table)
    config: dict = {ROUND: round_, **mark.config()}
    if local_epochs is not None:
        config[LOCAL_EPOCHS] = local_epochs
    return [_request(node, TRAIN, {**config, USERS: users}, model)
            for node, users in node_users.items()]


def read_train_request(request: Message) -> TrainRequest:
    config = request.content[CONFIG]
    epochs = int(config[LOCAL_EPOCHS]) if LOCAL_EPOCHS in config else None
    replay = read_stored_rows_request(request) if REPLAY_ROUND in config else None
    return TrainRequest(int(config[ROUND]), np.asarray(config[USERS], dtype=np.int64),
                        _tensor(request.content[ARRAYS], TABLE), run_mark(request), epochs,
                        replay)


# ------------------------------------------------------------------- query.restart (Retrain)
RESTART = "query.restart"


def restart_requests(node_users: Mapping[int, list[int]], mark: RunMark) -> list[Message]:
    """Retrain through Flower: every node drops its users' trained embeddings and starts over
    from their initial ones; the reply is empty."""
    return [_request(node, RESTART, {**mark.config(), USERS: list(users)})
            for node, users in node_users.items()]


def restart_reply(request: Message) -> Message:
    return _reply(request)


# ------------------------------------------------------------- unlearning by replay (FRU)
@dataclass
class StoredRowsRequest:
    """FRU's replay of learning round ``round``: the node's users that took part in it and
    their weights |D_u| then; the node sends back its stored rows of that round, weighted."""

    round: int
    users: np.ndarray
    weights: np.ndarray


def _replay_config(round_: int, users: list[int], weights: list[float]) -> dict:
    return {REPLAY_ROUND: round_, USERS: list(users), WEIGHTS: [float(w) for w in weights]}


def stored_rows_requests(round_: int, node_users: Mapping[int, list[int]],
                         weights: Mapping[int, float], mark: RunMark) -> list[Message]:
    """The first replayed round trains nothing: ask each node only for its stored rows."""
    return [_request(node, FRU_ROWS, {**mark.config(), **_replay_config(
        round_, users, [weights[u] for u in users])}) for node, users in node_users.items()]


def replay_train_requests(round_: int, replayed: int, node_users: Mapping[int, list[int]],
                          weights: Mapping[int, float], table: Tensor, mark: RunMark,
                          local_epochs: int, stored: bool) -> list[Message]:
    """A calibration round: train from ``table`` (round number ``round_``, for the random
    streams) and, with ``stored`` (FRU), also send the stored rows of learning round
    ``replayed``."""
    messages = train_requests(round_, node_users, table, mark, local_epochs)
    if stored:
        for message in messages:
            users = list(message.content[CONFIG][USERS])
            for key, value in _replay_config(replayed, users, [weights[u] for u in users]
                                             ).items():
                message.content[CONFIG][key] = value
    return messages


def read_stored_rows_request(request: Message) -> StoredRowsRequest:
    config = request.content[CONFIG]
    users = np.asarray(config[USERS], dtype=np.int64)
    weights = np.asarray(config[WEIGHTS], dtype=np.float64)
    if users.shape != weights.shape:
        raise ValueError("one weight per user is needed")
    return StoredRowsRequest(int(config[REPLAY_ROUND]), users, weights)


def stored_rows_record(items: Tensor, sums: Tensor, row_weights: Tensor) -> ArrayRecord:
    return ArrayRecord({FRU_ITEMS: _ints(items.numpy()), FRU_SUMS: _table(sums),
                        FRU_ROW_WEIGHTS: _table(row_weights)})


def stored_rows_reply(request: Message, items: Tensor, sums: Tensor, row_weights: Tensor
                      ) -> Message:
    """The node's stored rows of the asked round: per item, ``sum_u w_u row_u`` and
    ``sum_u w_u`` over its users that stored that item."""
    return _reply(request, stored_rows_record(items, sums, row_weights))


def read_stored_rows(content: RecordDict, num_items: int, dim: int
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """(items, weighted row sums, row weights) of a stored-rows reply; raises ``ValueError``
    unless they fit the catalogue and are finite."""
    arrays = content[ARRAYS]
    items = _tensor(arrays, FRU_ITEMS)
    sums, weights = _tensor(arrays, FRU_SUMS), _tensor(arrays, FRU_ROW_WEIGHTS)
    if items.ndim != 1 or items.dtype != torch.int64 or sums.shape != (len(items), dim) \
            or weights.shape != (len(items),) or (len(items) and (
                int(items.min()) < 0 or int(items.max()) >= num_items)) \
            or not bool(torch.isfinite(sums).all()) or not bool(torch.isfinite(weights).all()):
        raise ValueError("stored rows that do not fit the catalogue")
    return items, sums, weights


# ---------------------------------------------------------- CUFRU's per-sharer uploads
def sparse_updates_record(updates: list[tuple[int, Tensor, Tensor]]) -> ArrayRecord:
    """CUFRU's learning-phase upload: each trained sharer's rows (item ids, deltas)."""
    dim = updates[0][2].shape[1] if updates else 0
    return ArrayRecord({
        CUFRU_USERS: _ints([u for u, _, _ in updates]),
        CUFRU_COUNTS: _ints([len(items) for _, items, _ in updates]),
        CUFRU_ITEMS: _ints(np.concatenate([items.numpy() for _, items, _ in updates])
                           if updates else np.zeros(0, np.int64)),
        CUFRU_DELTAS: _table(torch.cat([rows for _, _, rows in updates]) if updates
                             else torch.zeros(0, dim))})


def read_sparse_updates(content: RecordDict, asked: Iterable[int], num_items: int, dim: int
                        ) -> list[tuple[int, Tensor, Tensor]]:
    """The per-sharer sparse updates of a train reply (none if it has none); raises
    ``ValueError`` unless each names a user that was asked and fits the catalogue."""
    arrays = content[ARRAYS]
    if CUFRU_USERS not in arrays:
        return []
    users, counts = arrays[CUFRU_USERS].numpy(), arrays[CUFRU_COUNTS].numpy()
    items, deltas = _tensor(arrays, CUFRU_ITEMS), _tensor(arrays, CUFRU_DELTAS)
    if users.shape != counts.shape or (counts < 0).any() or int(counts.sum()) != len(items) \
            or deltas.shape != (len(items), dim) or not set(users.tolist()) <= set(asked) \
            or (len(items) and (int(items.min()) < 0 or int(items.max()) >= num_items)) \
            or not bool(torch.isfinite(deltas).all()):
        raise ValueError("sparse updates that do not fit the users asked or the catalogue")
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [(int(u), items[lo:hi], deltas[lo:hi])
            for u, lo, hi in zip(users.tolist(), bounds[:-1], bounds[1:], strict=True)]


def train_metrics(num_users: int, weight: float) -> MetricRecord:
    """How many users trained and their summed |D_u|: a node's, or a round's in all."""
    return MetricRecord({WEIGHT: float(weight), NUM_USERS: int(num_users)})


def train_reply(request: Message, update: NodeUpdate, fru_bytes: Mapping[int, int],
                extra: ArrayRecord | None = None) -> Message:
    """A node's averaged update (Eq. 16 over its users), its FRU store sizes, if any, and
    ``extra`` arrays (FRU's stored rows in a replay, CUFRU's sparse updates)."""
    arrays = ArrayRecord({TABLE: _table(update.table), ROW_WEIGHT: _table(update.row_weight)})
    if fru_bytes:
        arrays[FRU_USERS] = _ints(list(fru_bytes))
        arrays[FRU_BYTES] = _ints(list(fru_bytes.values()))
    for key, value in (extra or {}).items():
        arrays[key] = value
    return _reply(request, arrays, train_metrics(update.num_users, update.weight))


def read_train_reply(content: RecordDict, asked: Iterable[int]
                     ) -> tuple[NodeUpdate, list[tuple[int, int]]]:
    """The node's update and its (user, bytes) FRU store report, which may name only users it
    was ``asked`` to train. The update's values are checked by
    :func:`fedshare.federated.validation.update_problem`."""
    arrays, metrics = content[ARRAYS], content[METRICS]
    update = NodeUpdate(_tensor(arrays, TABLE), float(metrics[WEIGHT]),
                        _tensor(arrays, ROW_WEIGHT), int(metrics[NUM_USERS]))
    if FRU_USERS not in arrays and FRU_BYTES not in arrays:
        return update, []
    users, sizes = arrays[FRU_USERS].numpy(), arrays[FRU_BYTES].numpy()
    if users.shape != sizes.shape or users.ndim != 1 or users.dtype.kind != "i" \
            or sizes.dtype.kind != "i" or (sizes < 0).any() or not set(
                users.tolist()) <= set(asked):
        raise ValueError("an FRU store report that does not fit the users asked")
    return update, list(zip(users.tolist(), sizes.tolist(), strict=True))


# --------------------------------------------------------------------------------- evaluate
@dataclass
class EvaluateRequest:
    table: Tensor
    parts: tuple[str, ...]
    mark: RunMark


def evaluate_requests(nodes: Iterable[int], table: Tensor, parts: tuple[str, ...],
                      mark: RunMark) -> list[Message]:
    model = table_record(table)
    return [_request(node, EVALUATE, {PARTS: ",".join(parts), **mark.config()}, model)
            for node in nodes]


def read_evaluate_request(request: Message) -> EvaluateRequest:
    config = request.content[CONFIG]
    return EvaluateRequest(_tensor(request.content[ARRAYS], TABLE),
                           tuple(str(config.get(PARTS, "valid")).split(",")),
                           run_mark(request))


def evaluate_reply(request: Message, scores: Mapping[str, tuple[Mapping[str, float], int]]
                   ) -> Message:
    """Per part, the metric sums over the node's users and their count."""
    metrics: dict[str, float] = {}
    for part, (sums, count) in scores.items():
        metrics |= {f"{part}:{name}": float(value) for name, value in sums.items()}
        metrics[f"{part}:{COUNT}"] = count
    return _reply(request, metrics=MetricRecord(metrics))


def read_evaluate_reply(content: RecordDict, parts: tuple[str, ...]
                        ) -> dict[str, tuple[dict[str, float], int]]:
    """Per part, (metric sums, user count) of one node. Raises ``ValueError`` unless each count
    is a non-negative whole number and each sum is finite and in [0, count] (every metric of
    one user lies in [0, 1]), and no part was sent that was not asked for."""
    metrics = {key: float(value) for key, value in content[METRICS].items()}
    if any(key.split(":", 1)[0] not in parts for key in metrics):
        raise ValueError("metrics of a part that was not asked for")
    scores = {}
    for part in parts:
        count = metrics.get(f"{part}:{COUNT}")
        if count is None or not math.isfinite(count) or count < 0 or count != int(count):
            raise ValueError(f"no sound user count for {part}")
        sums = {key.split(":", 1)[1]: value for key, value in metrics.items()
                if key.startswith(f"{part}:") and key != f"{part}:{COUNT}"}
        if any(not math.isfinite(v) or v < 0 or v > count for v in sums.values()):
            raise ValueError(f"a metric sum outside [0, count] for {part}")
        scores[part] = (sums, int(count))
    return scores


# ------------------------------------------------------- secure aggregation (SecAgg+, issue 20)
# A SecAgg+ round (run config ``defence`` naming ``secagg``; the stages: strategies.secagg, the
# shared computations: fedshare.secure_sum) replaces one ``train`` exchange with four. Keys,
# ciphertexts and shares travel as bytes in config records.
SECAGG_SETUP = "query.secagg_setup"
SECAGG_SHARE_KEYS = "query.secagg_share_keys"
SECAGG_TRAIN = f"{MessageType.TRAIN}.secagg"
SECAGG_UNMASK = "query.secagg_unmask"
MASK_KEY, SHARE_KEY, NODES, MASK_KEYS, SHARE_KEYS = (
    "mask-key", "share-key", "nodes", "mask-keys", "share-keys")
SOURCES, DESTINATIONS, CIPHERTEXTS, SCALE, MASKED = (
    "sources", "destinations", "ciphertexts", "secagg-scale", "masked-vector")
ACTIVE, DROPPED, OWNERS, SHARES = "active", "dropped", "owners", "shares"
MAX_SECRET_BYTES = 1 << 16
"""The largest key, ciphertext or share a reader accepts."""


def message_bytes(content: RecordDict) -> int:
    """:func:`array_bytes` plus the payload of config and metric records: bytes and strings at
    their length, 8 bytes per number (SecAgg+'s keys, ciphertexts, shares and node lists)."""

    def size(value: object) -> int:
        if isinstance(value, list):
            return sum(size(v) for v in value)
        return len(value) if isinstance(value, bytes | str) else 8

    records = [*content.config_records.values(), *content.metric_records.values()]
    return array_bytes(content) + sum(size(v) for r in records for v in r.values())


def _config_reply(request: Message, config: Mapping) -> Message:
    return Message(RecordDict({CONFIG: ConfigRecord(dict(config))}), reply_to=request)


def _secrets(values: object, count: int | None = None) -> list[bytes]:
    """``values`` as a list of non-empty bytes of bounded size (``count`` of them)."""
    if not isinstance(values, list) or any(
            not isinstance(v, bytes) or not 0 < len(v) <= MAX_SECRET_BYTES for v in values) \
            or (count is not None and len(values) != count):
        raise ValueError("malformed keys, ciphertexts or shares")
    return values


def _node_ids(values: object) -> list[int]:
    if not isinstance(values, list) or any(isinstance(v, bool) or not isinstance(v, int)
                                           for v in values) or len(set(values)) != len(values):
        raise ValueError("malformed node ids")
    return values


def secagg_setup_requests(round_: int, nodes: Iterable[int], settings: SecAggSettings
                          ) -> list[Message]:
    """Stage 1: each node makes the round's two key pairs (the settings come along)."""
    config = {ROUND: round_, **settings.to_run_config()}
    return [_request(node, SECAGG_SETUP, config) for node in nodes]


def read_secagg_setup_request(request: Message) -> tuple[int, SecAggSettings]:
    config = request.content[CONFIG]
    try:
        settings = SecAggSettings.from_run_config(config)
    except FedShareError as exc:
        raise ValueError(str(exc)) from None
    return int(config[ROUND]), settings


def secagg_setup_reply(request: Message, mask_public: bytes, share_public: bytes) -> Message:
    return _config_reply(request, {MASK_KEY: mask_public, SHARE_KEY: share_public})


def read_secagg_setup_reply(content: RecordDict) -> tuple[bytes, bytes]:
    """A node's (mask, share) public keys."""
    config = content[CONFIG]
    mask, share = _secrets([config[MASK_KEY], config[SHARE_KEY]], 2)
    return mask, share


def secagg_share_keys_requests(round_: int, neighbourhoods: Mapping[int, list[int]],
                               keys: Mapping[int, tuple[bytes, bytes]]) -> list[Message]:
    """Stage 2: each node gets its neighbourhood's public keys (its own included) and seals
    shares of its two secrets to them."""
    return [_request(node, SECAGG_SHARE_KEYS, {
        ROUND: round_, NODES: list(nodes), MASK_KEYS: [keys[n][0] for n in nodes],
        SHARE_KEYS: [keys[n][1] for n in nodes]}) for node, nodes in neighbourhoods.items()]


def read_secagg_share_keys_request(request: Message
                                   ) -> tuple[int, list[int], list[bytes], list[bytes]]:
    """(round, neighbourhood, their mask keys, their share keys)."""
    config = request.content[CONFIG]
    nodes = _node_ids(config[NODES])
    return (int(config[ROUND]), nodes, _secrets(config[MASK_KEYS], len(nodes)),
            _secrets(config[SHARE_KEYS], len(nodes)))


def secagg_share_keys_reply(request: Message, sealed: Mapping[int, bytes]) -> Message:
    return _config_reply(request, {DESTINATIONS: list(sealed),
                                   CIPHERTEXTS: list(sealed.values())})


def read_secagg_share_keys_reply(content: RecordDict, neighbours: Iterable[int]
                                 ) -> dict[int, bytes]:
    """The sealed share pairs of a node, by receiver; each receiver one of ``neighbours``."""
    return _secrets_by_node(content, DESTINATIONS, CIPHERTEXTS, neighbours,
                            "shares sealed to nodes that are no neighbours")


def secagg_train_requests(round_: int, node_users: Mapping[int, list[int]], table: Tensor,
                          mark: RunMark, local_epochs: int | None,
                          sealed: Mapping[int, Mapping[int, bytes]], scale: float
                          ) -> list[Message]:
    """Stage 3: what :func:`train_requests` asks, as ``train.secagg``, with the share pairs
    sealed to each node, by sender, and the round's scale W."""
    model = table_record(table)
    config: dict = {ROUND: round_, **mark.config(), SCALE: float(scale)}
    if local_epochs is not None:
        config[LOCAL_EPOCHS] = local_epochs
    return [_request(node, SECAGG_TRAIN, {
        **config, USERS: users, SOURCES: list(sealed.get(node, {})),
        CIPHERTEXTS: list(sealed.get(node, {}).values())}, model)
        for node, users in node_users.items()]


def read_secagg_train_request(request: Message
                              ) -> tuple[TrainRequest, dict[int, bytes], float]:
    """(the train request, the share pairs sealed to this node by sender, the scale)."""
    config = request.content[CONFIG]
    sources = _node_ids(config[SOURCES])
    scale = float(config[SCALE])
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale {scale}")
    return (read_train_request(request),
            dict(zip(sources, _secrets(config[CIPHERTEXTS], len(sources)), strict=True)), scale)


def secagg_train_reply(request: Message, masked: np.ndarray) -> Message:
    """The masked vector: nothing else of the update leaves the node."""
    return _reply(request, ArrayRecord({MASKED: _ints(masked)}))


def read_secagg_train_reply(content: RecordDict, length: int, modulus: int) -> np.ndarray:
    masked = content[ARRAYS][MASKED].numpy()
    if masked.shape != (length,) or masked.dtype != np.int64 or (masked < 0).any() or (
            masked >= modulus).any():
        raise ValueError(f"not {length} integers modulo {modulus}")
    return masked


def secagg_unmask_requests(round_: int, lists: Mapping[int, tuple[list[int], list[int]]]
                           ) -> list[Message]:
    """Stage 4: each survivor is named its neighbours that survived (send shares of their
    self-mask seeds) and those that dropped (send shares of their mask keys)."""
    return [_request(node, SECAGG_UNMASK, {ROUND: round_, ACTIVE: list(active),
                                           DROPPED: list(dropped)})
            for node, (active, dropped) in lists.items()]


def read_secagg_unmask_request(request: Message) -> tuple[int, list[int], list[int]]:
    config = request.content[CONFIG]
    active, dropped = _node_ids(config[ACTIVE]), _node_ids(config[DROPPED])
    if set(active) & set(dropped):
        raise ValueError("a node named both active and dropped")
    return int(config[ROUND]), active, dropped


def secagg_unmask_reply(request: Message, shares: Mapping[int, bytes]) -> Message:
    return _config_reply(request, {OWNERS: list(shares), SHARES: list(shares.values())})


def read_secagg_unmask_reply(content: RecordDict, asked: Iterable[int]) -> dict[int, bytes]:
    """The shares a survivor sent, by owner; each owner one of those it was ``asked`` for."""
    return _secrets_by_node(content, OWNERS, SHARES, asked,
                            "shares of nodes that were not asked for")


def _secrets_by_node(content: RecordDict, ids_key: str, values_key: str,
                     allowed: Iterable[int], refusal: str) -> dict[int, bytes]:
    """A reply's byte strings keyed by node id, every id one of ``allowed``."""
    config = content[CONFIG]
    nodes = _node_ids(config[ids_key])
    values = _secrets(config[values_key], len(nodes))
    if not set(nodes) <= set(allowed):
        raise ValueError(refusal)
    return dict(zip(nodes, values, strict=True))


# ------------------------------------------------------------- sequence models (issue 17)
# The second model family of the same app (run config ``family = "sequence"``). A device is one
# session; the global model travels as one flat float32 vector. Message types are
# ``<category>.sequence[_<step>]``.
SEQ_DEVICES = "query.sequence_devices"
SEQ_TRAIN = f"{MessageType.TRAIN}.sequence"
SEQ_EVALUATE = f"{MessageType.EVALUATE}.sequence"
MODEL = "sequence-model"
SESSIONS, SESSION_PARTS, SESSION_WEIGHTS, MAX_LEN = (
    "sessions", "session-parts", "session-weights", "max-len")
SEQ_PARTS = {"valid": VALID, "test": TEST}
"""Evaluation parts by their wire name (``parts`` config) and the session part they score."""


def model_record(vector: Tensor) -> ArrayRecord:
    """The global sequence model (a flat float32 vector), built once a round and shared by the
    round's messages."""
    return ArrayRecord({MODEL: Array(vector.detach().numpy().astype(np.float32))})


def _vector(content: RecordDict) -> Tensor:
    vector = _tensor(content[ARRAYS], MODEL)
    if vector.ndim != 1 or vector.dtype != torch.float32:
        raise ValueError("the model is not a flat float32 vector")
    return vector


def sequence_devices_request(node: int) -> Message:
    return _request(node, SEQ_DEVICES, {})


def sequence_devices_reply(request: Message, sessions: np.ndarray, parts: np.ndarray,
                           weights: np.ndarray, num_items: int, max_len: int) -> Message:
    """The node's devices (session ids), their parts and |D_u|, and the catalogue."""
    arrays = ArrayRecord({SESSIONS: _ints(sessions), SESSION_PARTS: _ints(parts),
                          SESSION_WEIGHTS: _ints(weights)})
    return _reply(request, arrays, MetricRecord({NUM_ITEMS: num_items, MAX_LEN: max_len}))


def read_sequence_devices_reply(reply: Message) -> DeviceReport:
    """A node's device report; :meth:`DeviceReport.problem` says whether it can be used."""
    arrays, metrics = reply.content[ARRAYS], reply.content[METRICS]
    return DeviceReport(reply.metadata.src_node_id, arrays[SESSIONS].numpy(),
                        arrays[SESSION_PARTS].numpy(), arrays[SESSION_WEIGHTS].numpy(),
                        int(metrics[NUM_ITEMS]), int(metrics[MAX_LEN]))


@dataclass
class SequenceTrainRequest:
    """Round ``round``: train the node's ``sessions`` sampled this round from ``vector``."""

    round: int
    sessions: np.ndarray
    vector: Tensor


def sequence_train_requests(round_: int, node_sessions: Mapping[int, list[int]],
                            vector: Tensor) -> list[Message]:
    """One ``train.sequence`` message per node, naming its sampled devices."""
    model = model_record(vector)
    return [_request(node, SEQ_TRAIN, {ROUND: round_, SESSIONS: list(sessions)}, model)
            for node, sessions in node_sessions.items()]


def read_sequence_train_request(request: Message) -> SequenceTrainRequest:
    config = request.content[CONFIG]
    return SequenceTrainRequest(int(config[ROUND]),
                                np.asarray(config[SESSIONS], dtype=np.int64),
                                _vector(request.content))


def sequence_train_reply(request: Message, update: NodeUpdate) -> Message:
    """The weighted mean vector of the node's trained devices, their summed |D_u| and count."""
    return _reply(request, model_record(update.table),
                  train_metrics(update.num_users, update.weight))


def read_sequence_train_reply(content: RecordDict) -> NodeUpdate:
    """A node's update (its one "row weight" is its weight); values are checked by the
    caller against what it asked."""
    metrics = content[METRICS]
    weight = float(metrics[WEIGHT])
    return NodeUpdate(_vector(content), weight, torch.tensor([weight]),
                      int(metrics[NUM_USERS]))


def sequence_evaluate_requests(nodes: Iterable[int], vector: Tensor, parts: tuple[str, ...]
                               ) -> list[Message]:
    """Score ``vector`` on every device of ``parts`` the nodes serve; replies are
    :func:`evaluate_reply`'s sums and counts (counts are prediction points)."""
    if not set(parts) <= set(SEQ_PARTS):
        raise ValueError(f"unknown parts {parts}")
    model = model_record(vector)
    return [_request(node, SEQ_EVALUATE, {PARTS: ",".join(parts)}, model) for node in nodes]


def read_sequence_evaluate_request(request: Message) -> tuple[Tensor, tuple[str, ...]]:
    parts = tuple(str(request.content[CONFIG][PARTS]).split(","))
    if not set(parts) <= set(SEQ_PARTS):
        raise ValueError(f"unknown parts {parts}")
    return _vector(request.content), parts


# ---------------------------------------------------------------- sequence unlearning (CAU)
SEQ_REQUESTS = "query.sequence_requests"
SEQ_CAU_SCORES = "query.sequence_cau_scores"
SEQ_CAU_STEP = f"{MessageType.TRAIN}.sequence_cau_step"
SEQ_CAU_LOCAL = f"{MessageType.TRAIN}.sequence_cau_local"
SEQ_FORGET = f"{MessageType.EVALUATE}.sequence_forget"
REQUEST_COUNTS, POSITIONS, SESSION_LENGTHS = "request-counts", "positions", "session-lengths"
CAU_SCORES, TASK_GRADIENTS, STEP, SAMPLES = "cau-scores", "task-gradients", "step", "samples"


def model_requests(message_type: str, nodes: Iterable[int], vector: Tensor) -> list[Message]:
    """One message of ``message_type`` per node, carrying only the model (built once)."""
    model = model_record(vector)
    return [_request(node, message_type, {}, model) for node in nodes]


def read_model_request(request: Message) -> Tensor:
    return _vector(request.content)


def sequence_requests_reply(request: Message, requests: Mapping[int, list[int]],
                            lengths: Mapping[int, int]) -> Message:
    """The node's requesting devices, their forgotten positions and session lengths."""
    sessions = sorted(requests)
    return _reply(request, ArrayRecord({
        SESSIONS: _ints(sessions), REQUEST_COUNTS: _ints([len(requests[s]) for s in sessions]),
        POSITIONS: _ints([t for s in sessions for t in sorted(requests[s])]),
        SESSION_LENGTHS: _ints([lengths[s] for s in sessions])}))


def read_sequence_requests_reply(reply: Message) -> RequestReport:
    """A node's requests; :meth:`RequestReport.problem` says whether they can be served."""
    arrays = reply.content[ARRAYS]
    return RequestReport(reply.metadata.src_node_id, arrays[SESSIONS].numpy(),
                         arrays[REQUEST_COUNTS].numpy(), arrays[POSITIONS].numpy(),
                         arrays[SESSION_LENGTHS].numpy())


def sequence_scores_reply(request: Message, scores: np.ndarray) -> Message:
    return _reply(request, ArrayRecord({CAU_SCORES: Array(np.asarray(scores, np.float64))}))


def read_sequence_scores_reply(content: RecordDict, expected: int) -> np.ndarray:
    """One finite difficulty per forget sample the node holds (``expected`` of them)."""
    scores = content[ARRAYS][CAU_SCORES].numpy()
    if scores.shape != (expected,) or scores.dtype != np.float64 or not np.isfinite(
            scores).all():
        raise ValueError(f"not {expected} finite difficulties")
    return scores


def sequence_cau_step_requests(step: int, node_samples: Mapping[int, list[int]],
                               vector: Tensor) -> list[Message]:
    """A joint CAU step: each node gets the model and its samples in the batch."""
    model = model_record(vector)
    return [_request(node, SEQ_CAU_STEP, {STEP: step, SAMPLES: list(samples)}, model)
            for node, samples in node_samples.items()]


def read_sequence_cau_step_request(request: Message) -> tuple[int, np.ndarray, Tensor]:
    """(step, the node's sample indices, model)."""
    config = request.content[CONFIG]
    return (int(config[STEP]), np.asarray(config[SAMPLES], dtype=np.int64),
            _vector(request.content))


def sequence_cau_step_reply(request: Message, sums: Tensor, count: int) -> Message:
    return _reply(request, ArrayRecord({TASK_GRADIENTS: _table(sums)}),
                  MetricRecord({WEIGHT: count}))


def read_sequence_cau_step_reply(content: RecordDict, size: int, expected: int
                                 ) -> tuple[Tensor, int]:
    """The ``[3, size]`` finite gradient sums over the ``expected`` samples asked."""
    sums = _tensor(content[ARRAYS], TASK_GRADIENTS)
    count = int(content[METRICS][WEIGHT])
    if sums.shape != (3, size) or sums.dtype != torch.float32 or not bool(
            torch.isfinite(sums).all()) or count != expected:
        raise ValueError(f"not three finite gradient sums over the {expected} samples asked")
    return sums, count


def sequence_forget_reply(request: Message, hits: Mapping[str, np.ndarray]) -> Message:
    return _reply(request, ArrayRecord({name: _ints(hits[name]) for name in HIT_METRICS}))


def read_sequence_forget_reply(content: RecordDict, expected: int) -> dict[str, np.ndarray]:
    """Per metric of :data:`HIT_METRICS`, one 0/1 per forget sample the node holds."""
    arrays = content[ARRAYS]
    if set(arrays) != set(HIT_METRICS):
        raise ValueError("not the Hit_u metrics asked")
    hits = {name: arrays[name].numpy() for name in HIT_METRICS}
    if any(h.shape != (expected,) or h.dtype.kind != "i" or not np.isin(h, (0, 1)).all()
           for h in hits.values()):
        raise ValueError(f"not {expected} hit indicators per metric")
    return hits
