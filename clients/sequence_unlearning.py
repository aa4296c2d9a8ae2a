"""The sequence family's unlearning handlers (registered on :data:`clients.app.app`).

A node answers ``query.sequence_requests`` with its devices' requests
(:class:`fedshare.sequences.cau_node.ForgetDevices`) and from then on (a flag in
``context.state``) its requesting devices train on their remaining sessions D_r only
(:mod:`clients.sequence`) and keep their forget samples for CAU. Their frozen reference P_ref,
computed once from the model that request carries, stays in ``context.state`` for every later
scoring and step message. The CAU settings come from the run config, as the server's do.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message

from fedshare import protocol
from fedshare.federated.population import NodeUpdate
from fedshare.runconfig import (
    load_sequences,
    node_sessions,
    sequence_config,
    sequence_data_key,
)
from fedshare.sequences.cau_node import ForgetDevices
from fedshare.sequences.federated import make_backbone
from fedshare.sequences.unlearning_config import SequenceUnlearning
from fedshare.unlearning.cau.unlearn import CAUConfig

REQUESTED = "fedshare-seq-requested"
REFERENCE = "fedshare-seq-reference"


def requested(context: Context) -> bool:
    """Whether this node has sent its requests (its requesters then hold D_r only)."""
    return REQUESTED in context.state


def _settings(context: Context) -> SequenceUnlearning:
    return SequenceUnlearning.from_run_config(context.run_config)


@lru_cache(maxsize=2)
def _build(key: tuple, sessions: tuple[int, ...], backbone: str, dim: int, dropout: float,
           fraction: float, seed: int) -> ForgetDevices:
    data = load_sequences(key)
    model = make_backbone(backbone, data.num_items, data.max_len, dim, dropout)  # its shape
    return ForgetDevices(data, sessions, model, fraction, seed)


def forget_devices(context: Context) -> ForgetDevices:
    """This node's requesting devices under the run's request rule."""
    config = sequence_config(context.run_config)
    key = sequence_data_key(context.run_config)
    sessions = node_sessions(context.node_config, load_sequences(key).num_sessions)
    return _build(key, tuple(sessions.tolist()), config.backbone, config.dim, config.dropout,
                  _settings(context).request_fraction, config.seed)


def _cau(context: Context) -> CAUConfig:
    config = sequence_config(context.run_config)
    return _settings(context).cau_config(config.backbone, config.seed)


def _reference(context: Context) -> torch.Tensor:
    return torch.from_numpy(context.state[REFERENCE]["log-probs"].numpy().copy())


def requests(msg: Message, context: Context) -> Message:
    """``query.sequence_requests``: report the requests, keep P_ref, switch to D_r."""
    devices = forget_devices(context)
    if not requested(context):
        reference = devices.reference(protocol.read_model_request(msg))
        context.state[REFERENCE] = ArrayRecord({"log-probs": Array(reference.numpy())})
        context.state[REQUESTED] = ConfigRecord({"done": True})
    return protocol.sequence_requests_reply(msg, devices.requests, devices.lengths)


def scores(msg: Message, context: Context) -> Message:
    """``query.sequence_cau_scores``: one difficulty per forget sample of the node."""
    vector = protocol.read_model_request(msg)
    return protocol.sequence_scores_reply(
        msg, forget_devices(context).scores(vector, _reference(context), _cau(context)))


def step(msg: Message, context: Context) -> Message:
    """``train.sequence_cau_step``: gradient sums over the node's samples in the batch."""
    step_, samples, vector = protocol.read_sequence_cau_step_request(msg)
    sums, count = forget_devices(context).gradient_sums(vector, _reference(context), samples,
                                                        step_, _cau(context))
    return protocol.sequence_cau_step_reply(msg, sums, count)


def local(msg: Message, context: Context) -> Message:
    """``train.sequence_cau_local``: each requesting device's CAU alone, weighted mean."""
    devices = forget_devices(context)
    mean, weight = devices.local(protocol.read_model_request(msg), _cau(context))
    return protocol.sequence_train_reply(
        msg, NodeUpdate(mean, float(weight), torch.full((1,), float(weight)),
                        len(devices.devices)))


def forget(msg: Message, context: Context) -> Message:
    """``evaluate.sequence_forget``: Hit_u indicators of the node's forget samples."""
    return protocol.sequence_forget_reply(
        msg, forget_devices(context).hits(protocol.read_model_request(msg)))
