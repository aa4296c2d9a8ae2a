"""The server's side of SecAgg+: a learning round's train exchange, summed securely.

With run config ``defence`` naming ``secagg``, :class:`strategies.fedshare.FedShareStrategy` asks
:class:`SecureRounds` for its train messages and for the round's update. Flower 1.42's
``SecAggPlusWorkflow`` runs SecAgg+ only through the legacy fit context; these are its stages on
the Message API (messages: :mod:`fedshare.protocol`; keys, shares, masks and the vector layout,
on Flower's primitives: :mod:`fedshare.secure_sum`; the nodes: :mod:`clients.secagg`):

- :meth:`SecureRounds.prepare` (``configure_train`` and the unlearning phase's remaining-data
  rounds, with the grid): ``query.secagg_setup`` collects each asked node's two public keys;
  the answering nodes are placed on a random ring and each gets its neighbourhood's keys
  (``query.secagg_share_keys``) and seals shares of its two secrets to its neighbours; the
  ``train.secagg`` messages it returns carry the train request and the pairs sealed to each
  node (the server forwards ciphertexts it cannot open).
- :meth:`SecureRounds.finish` (``aggregate_train``): the masked replies are added; every
  survivor is asked (``query.secagg_unmask``, on the grid kept from ``prepare``) for the shares
  of its surviving neighbours' self-mask seeds and of its dropped neighbours' mask keys (a node
  that answered the key exchange but sent no accepted masked reply has dropped: its pairwise
  masks are removed through its rebuilt key); the sum is unmasked and decoded into one
  synthetic update ``NodeUpdate(start + S_delta / S_w, S_w, S_rw, num_users)``, which the
  learning round aggregates as it would the nodes' own (aggregation is linear).

A round changes nothing (``finish`` returns ``None``, as a failed round does) when fewer than
``threshold`` nodes answer a stage or some node's secret could not be rebuilt from its
neighbours' shares. Every message of the four stages is counted each way
(:func:`fedshare.protocol.message_bytes`) and timed; :meth:`SecureRounds.row` gives a round's
``secagg-*`` metrics columns and :attr:`SecureRounds.history` every round's stages
(``secagg.json``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.common import log
from flwr.serverapp import Grid
from torch import Tensor

from fedshare import protocol, secure_sum
from fedshare.errors import FedShareError
from fedshare.federated.population import NodeUpdate
from fedshare.runconfig import SecAggSettings
from strategies.inbox import Inbox

STAGES = ("setup", "share-keys", "train", "unmask")


@dataclass
class _Round:
    """What the server keeps of one SecAgg+ round between its stages."""

    round: int
    grid: Grid
    scale: float
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # (mask, share) keys
    hood: dict[int, list[int]] = field(default_factory=dict)  # neighbourhoods, self included
    partners: dict[int, list[int]] = field(default_factory=dict)  # who sealed shares to whom
    costs: dict[str, dict[str, float]] = field(default_factory=dict)
    failed: str = ""
    sent: float = 0.0  # when the train messages left
    train_down: int = 0  # their bytes

    def cost(self, stage: str, messages: Iterable[Message], replies: Iterable[Message],
             seconds: float) -> None:
        messages, replies = list(messages), [r for r in replies if not r.has_error()]
        self.costs[stage] = {
            "messages": len(messages), "replies": len(replies),
            "bytes-down": sum(protocol.message_bytes(m.content) for m in messages),
            "bytes-up": sum(protocol.message_bytes(r.content) for r in replies),
            "seconds": seconds}


class SecureRounds:
    """SecAgg+ rounds of one run (module docstring).

    Args:
        settings: the run's SecAgg+ settings.
        inbox: where every reply is read or rejected.
        timeout: seconds each stage waits for replies.
        seed: the run seed (the neighbour rings are drawn from it and the round).
    """

    def __init__(self, settings: SecAggSettings, inbox: Inbox, timeout: float,
                 seed: int = 0) -> None:
        self.settings = settings
        self.inbox = inbox
        self.timeout = timeout
        self.seed = seed
        self.current: _Round | None = None
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ stages 1 and 2
    def prepare(self, round_: int, grid: Grid, node_users: Mapping[int, list[int]],
                table: Tensor, mark: protocol.RunMark, local_epochs: int | None,
                scale: float) -> list[Message]:
        """Set up round ``round_`` with the nodes of ``node_users`` and return its
        ``train.secagg`` messages (none when the round cannot go on)."""
        cfg = self.settings
        if len(node_users) * cfg.quantization >= cfg.modulus or scale >= cfg.modulus:
            raise FedShareError(f"secagg-modulus-bits={cfg.modulus_bits} cannot hold the sum of "
                                f"{len(node_users)} nodes' updates: raise it")
        state = self.current = _Round(round_, grid, float(scale))
        self.history.append({"round": round_, "nodes": len(node_users), "stages": state.costs})
        keys = self._exchange(state, "setup", protocol.secagg_setup_requests(
            round_, node_users, cfg), lambda m: protocol.read_secagg_setup_reply(m.content))
        if not self._enough(state, "setup", keys, {n: list(keys) for n in keys}):
            return []
        state.keys = keys
        rng = np.random.default_rng([self.seed, round_, 0x5EC])
        state.hood = secure_sum.neighbours(keys, cfg.num_shares, rng)
        sealed = self._exchange(
            state, "share-keys", protocol.secagg_share_keys_requests(round_, state.hood, keys),
            lambda m: protocol.read_secagg_share_keys_reply(
                m.content, set(state.hood[m.metadata.src_node_id]) - {m.metadata.src_node_id}))
        # a pair of nodes masks with each other when each sealed shares to the other
        forwarded = {receiver: {source: pairs[receiver] for source, pairs in sealed.items()
                                if receiver in pairs and source in sealed[receiver]}
                     for receiver in sealed}
        state.partners = {node: sorted(pairs) for node, pairs in forwarded.items()}
        if not self._enough(state, "share-keys", sealed, self._holders(state)):
            return []
        messages = protocol.secagg_train_requests(
            round_, {node: node_users[node] for node in sealed}, table, mark, local_epochs,
            forwarded, scale)
        state.train_down = sum(protocol.message_bytes(m.content) for m in messages)
        state.sent = time.perf_counter()
        return messages

    @staticmethod
    def _holders(state: _Round) -> dict[int, list[int]]:
        """Who holds shares of each node's secrets: itself and its mask partners."""
        return {node: [node, *partners] for node, partners in state.partners.items()}

    def _exchange(self, state: _Round, stage: str, messages: list[Message],
                  reader: Callable[[Message], Any]) -> dict[int, Any]:
        """Send one stage's messages; what each asked node's readable reply holds, by node."""
        started = time.perf_counter()
        replies = list(state.grid.send_and_receive(messages, timeout=self.timeout))
        state.cost(stage, messages, replies, time.perf_counter() - started)
        asked = {m.metadata.dst_node_id for m in messages}
        return {node: value for node, value in self.inbox.read(
            f"secagg-{stage}", state.round, [r for r in replies
                                             if r.metadata.src_node_id in asked], reader)}

    def _enough(self, state: _Round, stage: str, answered: Iterable[int],
                holders: Mapping[int, Iterable[int]], needed: Iterable[int] | None = None
                ) -> bool:
        """Whether ``threshold`` nodes answered and every node whose secret may be needed
        (``needed``, by default the answering ones) has ``threshold`` answering holders of its
        shares (itself included); else the round fails."""
        alive, threshold = set(answered), self.settings.threshold
        short = [node for node in (alive if needed is None else needed)
                 if len(alive & set(holders[node])) < threshold]
        if len(alive) >= threshold and not short:
            return True
        state.failed = (f"after {stage}, {len(alive)} nodes answered and {len(short)} of them "
                        f"have fewer than secagg-threshold={self.settings.threshold} holders")
        log(WARNING, "SecAgg round %d changes nothing: %s", state.round, state.failed)
        self.history[-1]["failed"] = state.failed
        return False

    # ------------------------------------------------------------------ stages 3 and 4
    def finish(self, round_: int, replies: Iterable[Message], start: Tensor
               ) -> tuple[NodeUpdate | None, list[int]]:
        """The round's summed update and the nodes it sums, or ``None`` (and the survivors)
        when the round cannot be unmasked."""
        state, cfg = self.current, self.settings
        replies = list(replies)
        if state is None or state.round != round_ or state.failed or not state.partners:
            return None, []
        seconds = time.perf_counter() - state.sent
        length = secure_sum.vector_length(*start.shape)
        masked = self._read_masked(state, replies, length, seconds)
        survivors = sorted(masked)
        dropped = sorted(set(state.partners) - set(masked))
        self.history[-1] |= {"survivors": len(survivors), "dropped": len(dropped)}
        if not self._enough(state, "train", survivors, self._holders(state), state.partners):
            return None, survivors
        started = time.perf_counter()
        lists = {node: (sorted({node, *state.partners[node]} & set(survivors)),
                        sorted(set(state.partners[node]) & set(dropped))) for node in survivors}
        shares = self._exchange(state, "unmask", protocol.secagg_unmask_requests(round_, lists),
                                lambda m: protocol.read_secagg_unmask_reply(
                                    m.content, [*lists[m.metadata.src_node_id][0],
                                                *lists[m.metadata.src_node_id][1]]))
        try:
            collected: dict[int, list[bytes]] = {}
            for pieces in shares.values():
                for owner, share in pieces.items():
                    collected.setdefault(owner, []).append(share)
            total = secure_sum.add(masked.values(), length, cfg.modulus)
            plain = secure_sum.unmask(
                total, {n: secure_sum.reconstruct(collected.get(n, []), cfg.threshold)
                        for n in survivors},
                {n: secure_sum.reconstruct(collected.get(n, []), cfg.threshold)
                 for n in dropped},
                {n: state.partners[n] for n in survivors},
                {n: keys[0] for n, keys in state.keys.items()}, cfg.modulus)
            update = secure_sum.decode(plain, len(survivors), start, state.scale, cfg)
        except ValueError as exc:
            state.failed = f"the sum could not be unmasked: {exc}"
            log(WARNING, "SecAgg round %d changes nothing: %s", round_, state.failed)
            self.history[-1]["failed"] = state.failed
            return None, survivors
        finally:
            state.costs["unmask"]["seconds"] = time.perf_counter() - started
        return update, survivors

    def _read_masked(self, state: _Round, replies: list[Message], length: int,
                     seconds: float) -> dict[int, np.ndarray]:
        """The accepted masked vectors, by node (only nodes that were sent one count)."""
        state.cost("train", [], replies, seconds)
        state.costs["train"] |= {"messages": len(state.partners), "bytes-down": state.train_down}
        return {node: vector for node, vector in self.inbox.read(
            "secagg-train", state.round,
            [r for r in replies if r.metadata.src_node_id in state.partners],
            lambda m: protocol.read_secagg_train_reply(m.content, length,
                                                       self.settings.modulus))}

    # --------------------------------------------------------------------------- costs
    def row(self, round_: int) -> dict[str, float]:
        """Round ``round_``'s ``metrics.csv`` columns: the bytes of its four stages each way
        and the seconds of the three stages a plain round does not have (setup, share keys,
        unmasking with the server's reconstruction)."""
        state = self.current
        if state is None or state.round != round_:
            return {}
        costs = state.costs.values()
        return {"secagg-bytes-down": sum(c["bytes-down"] for c in costs),
                "secagg-bytes-up": sum(c["bytes-up"] for c in costs),
                "secagg-seconds": sum(c["seconds"] for stage, c in state.costs.items()
                                      if stage != "train")}
