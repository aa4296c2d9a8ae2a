"""Where every reply the server receives is first handled: logged, audited, read or rejected.

Replies are untrusted. A reply carrying an error is logged and dropped; every other one is
written to the message audit (when the run has one: it records what reached the server), then
read with a :mod:`fedshare.protocol` reader. A reply that cannot be read, or that a later check
refuses, is rejected: logged, and kept in :attr:`Inbox.rejected` (the run summary's
``rejected_replies``) with its round, node and reason; never fatal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from logging import WARNING
from typing import TypeVar

from flwr.app import Message
from flwr.common import log

from strategies.audit import MessageAudit

T = TypeVar("T")
WHAT = {"share": "share reply", "unshare": "unsharing requests", "train": "train reply",
        "evaluate": "evaluation", "devices": "device report",
        "requests": "unlearning requests", "scores": "CAU difficulties",
        "cau": "CAU update", "forget": "Hit_u indicators",
        "secagg-setup": "SecAgg public keys", "secagg-share-keys": "SecAgg sealed shares",
        "secagg-train": "masked train reply", "secagg-unmask": "SecAgg unmasking shares"}
"""How a rejection names each kind of reply."""


class Inbox:
    def __init__(self, audit: MessageAudit | None = None) -> None:
        self.audit = audit
        self.rejected: list[dict] = []

    def reject(self, kind: str, round_: int, node: int, reason: str) -> None:
        log(WARNING, "round %d: rejected the %s of node %d: %s", round_, WHAT[kind], node,
            reason)
        self.rejected.append({"round": round_, "node": node, "reason": f"{WHAT[kind]}: {reason}"})

    def read(self, kind: str, round_: int, replies: Iterable[Message],
             reader: Callable[[Message], T]) -> Iterator[tuple[int, T]]:
        """``(node, reader(reply))`` for every reply of ``kind`` that can be read."""
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                log(WARNING, "node %d sent no %s: %s", node, WHAT[kind], reply.error.reason)
                continue
            if self.audit is not None:
                self.audit.record(kind, round_, reply)
            try:  # untrusted input: any failure to read it rejects it
                value = reader(reply)
            except Exception as exc:
                self.reject(kind, round_, node, f"malformed ({type(exc).__name__}: {exc})")
                continue
            yield node, value
