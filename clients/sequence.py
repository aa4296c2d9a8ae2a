"""The sequence family's ClientApp handlers (registered on :data:`clients.app.app`).

A node serves a cohort of devices (sessions), named by its node config as a LightGCN node's
users are (``user-id``, or ``partition-id`` / ``num-partitions`` over the sessions), so one node
per device is ``num-partitions`` = the number of sessions. A cohort trains each sampled device
on its own session from the global vector and replies their |D_u|-weighted mean
(:class:`fedshare.sequences.federated.SequenceCohort`); devices are stateless between rounds,
so nothing is kept in ``context.state``. The cohort is built once per process and reused.
Once the node has sent its unlearning requests (:mod:`clients.sequence_unlearning`), its
requesting devices hold their remaining sessions D_r only.
"""

from __future__ import annotations

from functools import lru_cache

from flwr.app import Context, Message

from clients.sequence_unlearning import forget_devices, requested
from fedshare import protocol
from fedshare.runconfig import load_sequences, node_sessions, sequence_config, sequence_data_key
from fedshare.sequences.federated import LocalConfig, SequenceCohort, make_backbone
from fedshare.sequences.requests import remaining_data


@lru_cache(maxsize=2)
def _build(key: tuple, sessions: tuple[int, ...], backbone: str, dim: int, dropout: float,
           local: LocalConfig, seed: int, forgotten: tuple[tuple[int, tuple[int, ...]], ...]
           ) -> SequenceCohort:
    data = load_sequences(key)
    model = make_backbone(backbone, data.num_items, data.max_len, dim, dropout)  # its shape
    if forgotten:
        data = remaining_data(data, {s: list(p) for s, p in forgotten})
    return SequenceCohort(data, sessions, model, local, seed)


def _cohort(context: Context) -> SequenceCohort:
    """This node's devices, of the run's model and local training (on D_r once requested)."""
    config = sequence_config(context.run_config)
    key = sequence_data_key(context.run_config)
    sessions = node_sessions(context.node_config, load_sequences(key).num_sessions)
    forgotten = tuple((s, tuple(p)) for s, p in sorted(forget_devices(context).requests.items())
                      ) if requested(context) else ()
    return _build(key, tuple(sessions.tolist()), config.backbone, config.dim, config.dropout,
                  LocalConfig(config.local_epochs, config.lr, config.optimizer, config.batched),
                  config.seed, forgotten)


def devices(msg: Message, context: Context) -> Message:
    """``query.sequence_devices``: the node's devices, their parts and |D_u|, the catalogue."""
    cohort = _cohort(context)
    data = load_sequences(sequence_data_key(context.run_config))
    return protocol.sequence_devices_reply(msg, cohort.sessions, cohort.part, cohort.weights,
                                           data.num_items, data.max_len)


def train(msg: Message, context: Context) -> Message:
    """``train.sequence``: local training of the round's sampled devices of this node."""
    request = protocol.read_sequence_train_request(msg)
    update = _cohort(context).train(request.vector, request.sessions, request.round)
    return protocol.sequence_train_reply(msg, update)


def evaluate(msg: Message, context: Context) -> Message:
    """``evaluate.sequence``: every prefix -> next item of the node's devices of each part
    asked, full ranking; metric sums and prediction-point counts per part."""
    vector, parts = protocol.read_sequence_evaluate_request(msg)
    cohort = _cohort(context)
    return protocol.evaluate_reply(msg, {part: cohort.evaluate(vector, protocol.SEQ_PARTS[part])
                                         for part in parts})
