"""Unlearning requests as the server receives them: checked, then logged durably until served.

Each node reports its requesting devices (one session each) with their forgotten positions and
the session length n, which the server needs to check the positions (it holds no items): a
report is refused when it names a session the node does not serve as a training device, one
already requested, a length that disagrees with the device's |D_u| (min(n, L + 1) - 1, reported
when the devices were described) or a position outside
:func:`fedshare.sequences.requests.position_range`.

The log (``requests.json`` in the run folder) is rewritten whole (:mod:`fedshare.atomic`) when
a report is accepted, before any unlearning starts, and again once the unlearned model is
written, marking every request served by the method: a crash in between leaves the requests
logged and unserved, never lost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedshare.atomic import write_json
from fedshare.sequences.data import TRAIN
from fedshare.sequences.directory import SequenceDirectory
from fedshare.sequences.requests import position_range


@dataclass(frozen=True)
class RequestReport:
    """One node's requests: per requesting device its session id, its count of forgotten
    positions and its length; the positions of all devices concatenated in that order."""

    node: int
    sessions: np.ndarray
    counts: np.ndarray
    positions: np.ndarray
    lengths: np.ndarray

    def requests(self) -> dict[int, list[int]]:
        """Session -> forgotten positions (1-based)."""
        bounds = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        return {int(s): self.positions[lo:hi].tolist() for s, lo, hi in
                zip(self.sessions, bounds[:-1], bounds[1:], strict=True)}

    def problem(self, directory: SequenceDirectory, logged: set[int]) -> str | None:
        """Why the report cannot be served, or ``None``."""
        arrays = (self.sessions, self.counts, self.positions, self.lengths)
        if any(a.ndim != 1 or a.dtype.kind != "i" for a in arrays) or len(
                {len(self.sessions), len(self.counts), len(self.lengths)}) != 1:
            return "sessions, counts and lengths are not three integer vectors of one length"
        if (self.counts < 1).any() or int(self.counts.sum()) != len(self.positions):
            return "position counts that do not add up to the positions sent"
        if len(np.unique(self.sessions)) != len(self.sessions):
            return "a session requested twice"
        for (session, positions), n in zip(self.requests().items(), self.lengths.tolist(),
                                           strict=True):
            if directory.node_of.get(session) != self.node or \
                    directory.part_of[session] != TRAIN:
                return f"session {session}, not a training device of this node"
            if session in logged:
                return f"session {session}, already requested"
            if min(n, directory.max_len + 1) - 1 != directory.weight_of[session]:
                return f"session {session}: a length that does not fit its |D_u|"
            lo, hi = position_range(n, directory.max_len)
            if len(set(positions)) != len(positions) or not all(lo <= t <= hi
                                                                for t in positions):
                return f"session {session}: a position outside [{lo}, {hi}]"
        return None


def remaining_weight(length: int, forgotten: int, max_len: int) -> int:
    """A requesting device's |D_u| on D_r: its window loses a prediction point only when the
    shortened session no longer fills it."""
    return min(length - forgotten, max_len + 1) - 1


class RequestLog:
    """The run's requests and whether they are served, in ``path`` (module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: list[dict] = []

    @property
    def sessions(self) -> set[int]:
        return {e["session"] for e in self.entries}

    def receive(self, node: int, requests: dict[int, list[int]]) -> None:
        """Log a node's accepted requests (written before they are served)."""
        at = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.entries += [{"session": s, "positions": p, "node": node, "received_at": at,
                          "served_by": None, "served_at": None}
                         for s, p in sorted(requests.items())]
        self._write()

    def mark_served(self, method: str) -> None:
        """Every logged request is served by ``method`` (call after the model is written)."""
        at = time.strftime("%Y-%m-%dT%H:%M:%S")
        for entry in self.entries:
            entry["served_by"], entry["served_at"] = method, at
        self._write()

    def counts(self) -> dict[str, int]:
        return {"received": len(self.entries),
                "served": sum(e["served_by"] is not None for e in self.entries)}

    def requests(self) -> dict[int, list[int]]:
        return {e["session"]: list(e["positions"]) for e in self.entries}

    def _write(self) -> None:
        write_json(self.path, {"requests": self.entries, **self.counts()})
