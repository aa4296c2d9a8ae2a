"""Which node serves which device, learned from the nodes' own reports (the server loads no data).

Before the first round every node reports the sessions (devices) it serves, each one's part
(training, validation or test device) and |D_u| (its prediction points: the FedAvg weight the
server sees in every train reply anyway), and the catalogue the model needs (items, input
length). Nothing of a session's items leaves the node. The server samples training devices from
this directory and checks train replies against it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from fedshare.errors import FedShareError
from fedshare.sequences.data import TEST, TRAIN, VALID


@dataclass(frozen=True)
class DeviceReport:
    """One node's devices: session ids, their parts and weights; the catalogue it holds."""

    node: int
    sessions: np.ndarray
    parts: np.ndarray
    weights: np.ndarray
    num_items: int
    max_len: int

    def problem(self) -> str | None:
        """Why the report cannot be used, or ``None``."""
        arrays = (self.sessions, self.parts, self.weights)
        if any(a.ndim != 1 or a.dtype.kind != "i" for a in arrays) or len(
                {len(a) for a in arrays}) != 1:
            return "sessions, parts and weights are not three integer vectors of one length"
        if (self.sessions < 0).any() or len(np.unique(self.sessions)) != len(self.sessions):
            return "session ids that are negative or repeated"
        if not np.isin(self.parts, (TRAIN, VALID, TEST)).all() or (self.weights < 0).any():
            return "an unknown part or a negative weight"
        if self.num_items < 1 or self.max_len < 1:
            return "an empty catalogue"
        return None


@dataclass
class SequenceDirectory:
    """Session -> node, part and |D_u| over every accepted report, and the catalogue."""

    node_of: dict[int, int]
    part_of: dict[int, int]
    weight_of: dict[int, int]
    num_items: int
    max_len: int

    def candidates(self) -> np.ndarray:
        """The training devices, sorted: what each round samples from (as ``run_federated``)."""
        return np.array(sorted(s for s, p in self.part_of.items() if p == TRAIN), np.int64)

    def by_node(self, sessions: Iterable[int]) -> dict[int, list[int]]:
        """``sessions`` grouped by the node serving them."""
        grouped: dict[int, list[int]] = {}
        for s in sessions:
            grouped.setdefault(self.node_of[int(s)], []).append(int(s))
        return grouped

    def nodes(self) -> list[int]:
        return sorted(set(self.node_of.values()))

    def expected(self, sessions: Sequence[int]) -> tuple[int, float]:
        """How many of ``sessions`` train (training devices with |D_u| > 0) and their summed
        |D_u|: what a correct train reply for them states."""
        training = [s for s in sessions if self.part_of[s] == TRAIN and self.weight_of[s] > 0]
        return len(training), float(sum(self.weight_of[s] for s in training))

    def counts(self) -> dict[str, int]:
        return count_parts(self.part_of.values())


def count_parts(parts: Iterable[int]) -> dict[str, int]:
    """Devices by part: ``{"train": ..., "valid": ..., "test": ...}``."""
    parts = list(parts)
    return {name: parts.count(part) for name, part in
            (("train", TRAIN), ("valid", VALID), ("test", TEST))}


def build_directory(reports: Iterable[DeviceReport]
                    ) -> tuple[SequenceDirectory, list[tuple[int, str]]]:
    """The directory of the sound reports, and ``(node, reason)`` for each refused one: a report
    that is malformed, names a session another node already serves, or disagrees with the first
    accepted report's catalogue. No accepted report at all is a :class:`FedShareError`."""
    directory: SequenceDirectory | None = None
    refused: list[tuple[int, str]] = []
    for report in reports:
        problem = report.problem()
        if problem is None and directory is not None:
            if (report.num_items, report.max_len) != (directory.num_items, directory.max_len):
                problem = "a catalogue that differs from the other nodes'"
            elif any(int(s) in directory.node_of for s in report.sessions):
                problem = "sessions another node serves"
        if problem is not None:
            refused.append((report.node, problem))
            continue
        if directory is None:
            directory = SequenceDirectory({}, {}, {}, report.num_items, report.max_len)
        for s, p, w in zip(report.sessions.tolist(), report.parts.tolist(),
                           report.weights.tolist(), strict=True):
            directory.node_of[s], directory.part_of[s], directory.weight_of[s] = \
                report.node, p, w
    if directory is None:
        raise FedShareError("no node described its devices")
    return directory, refused
