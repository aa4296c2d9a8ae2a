"""A node's side of SecAgg+ (run config ``defence`` naming ``secagg``), on the Message API.

Four handlers, one per stage of the server's round (:mod:`strategies.secagg`; messages:
:mod:`fedshare.protocol`; the computations, on Flower's cryptographic primitives:
:mod:`fedshare.secure_sum`):

1. ``query.secagg_setup``: make the round's two key pairs, send the public keys;
2. ``query.secagg_share_keys``: draw the self-mask seed, split it and the mask private key into
   Shamir shares among the neighbourhood the server names, seal each neighbour's pair of shares
   to it (only it can open them; the server forwards them);
3. ``train.secagg``: open the pairs sealed to this node, train as a ``train`` message would,
   encode the update, add the self mask and the pairwise masks agreed with every neighbour that
   sealed shares to it, send only that vector;
4. ``query.secagg_unmask``: for the neighbours the server names as survivors send the shares of
   their self-mask seeds, for those it names as dropped the shares of their mask keys (never
   both of one node; a node answers once per round).

What the stages need to remember (keys, the seed, the shares held) lives in ``context.state``
under :data:`STATE`, which never leaves the node; a new setup starts over, and a message out of
order raises (Flower then replies with an error and the server counts the node as dropped).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from logging import WARNING

from flwr.app import ConfigRecord, Context, Message
from flwr.common import log

from fedshare import protocol, secure_sum
from fedshare.federated.population import NodeUpdate
from fedshare.runconfig import SecAggSettings

STATE = "fedshare-secagg"
SETUP, SHARED, MASKED, UNMASKED = "setup", "shared", "masked", "unmasked"


def _state(context: Context, round_: int, stage: str) -> ConfigRecord:
    """The node's SecAgg state, which must be at ``stage`` of round ``round_``."""
    state = context.state.get(STATE, None)
    if state is None or int(state["round"]) != round_ or state["stage"] != stage:
        where = "none" if state is None else f"{state['stage']} of round {state['round']}"
        raise ValueError(f"SecAgg: round {round_} needs stage {stage}, this node is at {where}")
    return state


def _keys(state: ConfigRecord) -> secure_sum.Keys:
    return secure_sum.Keys(state["mask-private"], state["mask-public"],
                           state["share-private"], state["share-public"])


def setup(msg: Message, context: Context) -> Message:
    """Stage 1: new key pairs for the round."""
    round_, settings = protocol.read_secagg_setup_request(msg)
    keys = secure_sum.new_keys()
    context.state[STATE] = ConfigRecord({
        "round": round_, "stage": SETUP, **settings.to_run_config(),
        "mask-private": keys.mask_private, "mask-public": keys.mask_public,
        "share-private": keys.share_private, "share-public": keys.share_public})
    return protocol.secagg_setup_reply(msg, keys.mask_public, keys.share_public)


def share_keys(msg: Message, context: Context) -> Message:
    """Stage 2: shares of the seed and of the mask key, sealed to each neighbour."""
    round_, nodes, mask_keys, share_keys = protocol.read_secagg_share_keys_request(msg)
    state = _state(context, round_, SETUP)
    own, keys = msg.metadata.dst_node_id, _keys(state)
    settings = SecAggSettings.from_run_config(state)
    if own not in nodes or (mask_keys[nodes.index(own)], share_keys[nodes.index(own)]) != (
            keys.mask_public, keys.share_public):
        raise ValueError("SecAgg: this node's own keys are not among its neighbourhood's")
    if len(nodes) < settings.threshold or len(set(mask_keys + share_keys)) != 2 * len(nodes):
        raise ValueError("SecAgg: too small a neighbourhood, or public keys that repeat")
    seed = os.urandom(32)
    sealed, (seed_share, key_share) = secure_sum.share_secrets(
        own, keys, seed, nodes, share_keys, settings.threshold)
    state.update({"stage": SHARED, "seed": seed, "nodes": nodes, "mask-keys": mask_keys,
                  "share-keys": share_keys, "owners": [own], "seed-shares": [seed_share],
                  "key-shares": [key_share]})
    return protocol.secagg_share_keys_reply(msg, sealed)


def masked_train(msg: Message, context: Context,
                 train: Callable[[protocol.TrainRequest], NodeUpdate]) -> Message:
    """Stage 3: ``train`` the request's users, then send the update masked."""
    request, sealed, scale = protocol.read_secagg_train_request(msg)
    state = _state(context, request.round, SHARED)
    own, keys = msg.metadata.dst_node_id, _keys(state)
    settings = SecAggSettings.from_run_config(state)
    nodes = list(state["nodes"])
    opened = secure_sum.open_shares(own, keys, sealed, dict(zip(nodes, state["share-keys"],
                                                                strict=True)))
    if len(opened) + 1 < settings.threshold:
        raise ValueError("SecAgg: too few neighbours are left for the round")
    update = train(request)
    vector, clipped = secure_sum.encode(update, request.table, scale, settings)
    if clipped:
        log(WARNING, "SecAgg round %d: %d coordinates of this node's update were clipped to "
            "secagg-clip=%s", request.round, clipped, settings.clip)
    mask_keys = dict(zip(nodes, state["mask-keys"], strict=True))
    masked = secure_sum.mask(vector, own, state["seed"], keys,
                             {node: mask_keys[node] for node in opened}, settings.modulus)
    state.update({"stage": MASKED, "owners": [own, *opened],
                  "seed-shares": [state["seed-shares"][0], *(s for s, _ in opened.values())],
                  "key-shares": [state["key-shares"][0], *(k for _, k in opened.values())]})
    del state["seed"]  # the neighbours' shares rebuild it if the server needs it
    return protocol.secagg_train_reply(msg, masked)


def unmask(msg: Message, context: Context) -> Message:
    """Stage 4: shares of the survivors' seeds and of the dropped nodes' mask keys."""
    round_, active, dropped = protocol.read_secagg_unmask_request(msg)
    state = _state(context, round_, MASKED)
    settings = SecAggSettings.from_run_config(state)
    if len(active) < settings.threshold or msg.metadata.dst_node_id in dropped:
        raise ValueError("SecAgg: too few survivors to unmask, or this node named dropped")
    owners = list(state["owners"])
    seeds = dict(zip(owners, state["seed-shares"], strict=True))
    keys = dict(zip(owners, state["key-shares"], strict=True))
    state["stage"] = UNMASKED  # once per round: never a seed share and a key share of one node
    return protocol.secagg_unmask_reply(
        msg, {node: seeds[node] for node in active if node in seeds}
        | {node: keys[node] for node in dropped if node in keys})
