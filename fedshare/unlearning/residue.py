"""The erasure audit: where, in a finished run's server stores, a forgotten pair, a local-only
interaction or a pre-request snapshot could still live, and how many were found.

Ground truth comes from outside the server: the run's sharing plan (its data settings in
``config.toml``) or the deployed devices' own files. Every place is checked and reported, even
when it holds nothing, so a report says what was looked at:

- ``state.db`` ``shared``: D_s must hold no forgotten pair (once requests were served) and never
  a local-only interaction;
- ``state.db`` request log: a served request must keep no item id (only digests);
- ``state.db`` snapshots: after an unlearning phase only the final table may be kept;
- the bytes of ``state.db`` and its WAL: no SQLite record of a forgotten or local-only pair may
  survive in free pages or old WAL frames (the record of a ``shared`` row is its header and two
  big-endian integers, a byte string looked for directly);
- the run folder holds nothing but what a run writes (its outputs hold metrics and tables, never
  pairs); any other file is a finding;
- in a deployment, the SuperLink's database (``superlink.db`` and its WAL): no message may be
  left in its tables, and no integer array that a device's share or unshare reply carried (a
  ``.npy`` array of two or more ids, all of one user's shared items, its forgotten ones
  included) may survive in its bytes, free pages included.

Choices: the byte search of ``state.db`` decodes every place in the files that has the shape of
a ``shared`` row's SQLite cell (:func:`recorded_pairs`) and compares the pairs with the ground
truth; a test plants residue the search must find, and checks that a run's own files give no
chance match. The
SuperLink's messages hold Flower ``Array`` objects, whose bytes are ``.npy`` files: the search
there parses every ``.npy`` header in the file and reads the array after it (an array that
SQLite split across overflow pages is not found whole; a device's reply is far smaller than a
page).
"""

from __future__ import annotations

import ast
import contextlib
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedshare.data.device import DeviceData
from fedshare.data.prepared import PreparedData

Pairs = set[tuple[int, int]]


@dataclass
class GroundTruth:
    """What the server must not hold: the pairs unshared and the pairs kept local."""

    forgotten: Pairs
    local: Pairs
    shared: Pairs = field(default_factory=set)  # everything ever shared, forgotten included

    @classmethod
    def from_plan(cls, data: PreparedData) -> GroundTruth:
        train, plan = data.split.train, data.plan
        return cls(_pairs(train.users[plan.unlearn], train.items[plan.unlearn]),
                   _pairs(train.users[~plan.shared], train.items[~plan.shared]),
                   _pairs(train.users[plan.shared], train.items[plan.shared]))

    @classmethod
    def from_devices(cls, devices: Iterable[DeviceData]) -> GroundTruth:
        forgotten: Pairs = set()
        local: Pairs = set()
        shared: Pairs = set()
        for device in devices:
            forgotten |= {(device.user, int(i)) for i in device.unshare}
            local |= {(device.user, int(i)) for i in device.local}
            shared |= {(device.user, int(i)) for i in (*device.shared, *device.unshare)}
        return cls(forgotten, local, shared)

    def by_user(self, pairs: Pairs) -> dict[int, set[int]]:
        users: dict[int, set[int]] = {}
        for user, item in pairs:
            users.setdefault(user, set()).add(item)
        return users


@dataclass
class Finding:
    place: str
    what: str
    found: int


def _pairs(users: np.ndarray, items: np.ndarray) -> Pairs:
    return set(zip(np.asarray(users).tolist(), np.asarray(items).tolist(), strict=True))


SIZES = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 8, 8: 0, 9: 0}
"""SQLite's integer serial types and their body sizes (8 and 9 are the constants 0 and 1)."""


def _field(serial: int, body: bytes) -> int:
    return serial - 8 if serial in (8, 9) else int.from_bytes(body, "big", signed=True)


def recorded_pairs(raw: bytes) -> Pairs:
    """Every (user, item) that ``raw`` holds as a ``shared`` row's SQLite cell, live or left in
    free space: a table cell (payload size, rowid, header ``03 tu ti``, two integers) or an
    index cell (payload size, header ``04 tu ti tr``, three integers). The payload size before
    the header must match, which keeps chance matches in the float tables near zero."""
    data = np.frombuffer(raw, dtype=np.uint8)
    found: Pairs = set()
    for start in np.flatnonzero((data == 3) | (data == 4)).tolist():
        width = raw[start]
        serials = raw[start + 1:start + width]
        if len(serials) != width - 1 or any(t not in SIZES for t in serials):
            continue
        sizes = [SIZES[t] for t in serials]
        payload = width + sum(sizes)
        body = raw[start + width:start + payload]
        if len(body) != sum(sizes) or start == 0:
            continue
        if width == 3:  # table cell: [payload size][rowid varint][header][body]
            back = start - 1
            if raw[back] >= 0x80:
                continue
            while back > 0 and raw[back - 1] >= 0x80 and start - back < 9:
                back -= 1
            size_at = back - 1
        else:  # index cell: [payload size][header][body]
            size_at = start - 1
        if size_at < 0 or raw[size_at] != payload:
            continue
        user = _field(serials[0], body[:sizes[0]])
        item = _field(serials[1], body[sizes[0]:sizes[0] + sizes[1]])
        found.add((user, item))
    return found


OUTPUTS = {"state.db", "state.db-wal", "state.db-shm", "state.db.key", ".lease", "config.toml",
           "federation.toml", "config.json", "metrics.csv", "summary.json", "item_table.npy"}
"""What a run folder holds besides logs (``*.log``) and the clients' ``client-state/``."""


def audit_run(folder: Path, truth: GroundTruth) -> list[Finding]:
    """Every place of ``folder`` checked, with how many forbidden things it holds. Forgotten
    pairs are looked for once the run served its requests; a run with requests still pending
    is itself a finding (its unlearning phase has not finished)."""
    path = folder / "state.db"
    findings: list[Finding] = []
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT user, item FROM shared").fetchall()
        shared = {(int(u), int(i)) for u, i in rows}
        pending, served = db.execute("SELECT COUNT(*) - COUNT(served), COUNT(served) "
                                     "FROM requests").fetchone()
        findings.append(Finding("state.db request log", "requests not yet served", pending))
        findings.append(Finding("state.db shared (D_s)", "local-only interactions",
                                len(shared & truth.local)))
        findings.append(Finding("state.db request log", "item ids of served requests",
                                int(db.execute("SELECT COALESCE(SUM(LENGTH(items)), 0) / 8 "
                                               "FROM requests WHERE served IS NOT NULL")
                                    .fetchone()[0])))
        if served:
            findings.append(Finding("state.db shared (D_s)", "forgotten pairs",
                                    len(shared & truth.forgotten)))
            model = db.execute("SELECT data FROM tables WHERE kind = 'model'").fetchone()
            snapshots = db.execute("SELECT data FROM tables WHERE kind = 'snapshot'").fetchall()
            findings.append(Finding("state.db snapshots", "pre-request snapshots",
                                    sum(model is None or data != model[0]
                                        for (data,) in snapshots)))
    recorded: Pairs = set()
    for part in (path, path.with_name(path.name + "-wal")):
        if part.exists():
            recorded |= recorded_pairs(part.read_bytes())
    findings.append(Finding("state.db and WAL bytes", "records of local-only interactions",
                            len(recorded & truth.local)))
    if served:
        findings.append(Finding("state.db and WAL bytes", "records of forgotten pairs",
                                len(recorded & truth.forgotten)))
    unknown = [p.name for p in folder.iterdir()
               if p.name not in OUTPUTS and p.suffix != ".log" and p.name != "client-state"]
    findings.append(Finding("run folder", "files no run writes", len(unknown)))
    return findings


NPY = b"\x93NUMPY"
MESSAGE_TABLES = ("message_ins", "message_res", "objects")


def npy_int_arrays(raw: bytes) -> list[np.ndarray]:
    """Every 1-D integer array of two or more values stored in ``.npy`` form (Flower's
    ``Array``) whose bytes survive in ``raw``."""
    found = []
    start = raw.find(NPY)
    while start >= 0:
        with contextlib.suppress(ValueError, SyntaxError, TypeError, KeyError, IndexError):
            wide = raw[start + 6] >= 2  # format 2.0+: a 4-byte header length
            size = 4 if wide else 2
            length = int.from_bytes(raw[start + 8:start + 8 + size], "little")
            begin = start + 8 + size
            header = ast.literal_eval(raw[begin:begin + length].decode("latin1"))
            dtype, shape = np.dtype(header["descr"]), tuple(header["shape"])
            if dtype.kind in "iu" and len(shape) == 1 and 2 <= shape[0] < 10**7:
                body = raw[begin + length:begin + length + shape[0] * dtype.itemsize]
                if len(body) == shape[0] * dtype.itemsize:
                    found.append(np.frombuffer(body, dtype).astype(np.int64))
        start = raw.find(NPY, start + 1)
    return found


def audit_superlink(path: Path, truth: GroundTruth) -> list[Finding]:
    """The SuperLink's database of a deployment: messages left in its tables, and arrays of a
    user's shared items that hold its forgotten ones in its bytes (free pages and WAL too)."""
    findings = []
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        tables = {name for (name,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        left = sum(int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
                   for table in MESSAGE_TABLES if table in tables)
    findings.append(Finding("superlink.db", "messages left", left))
    arrays: list[np.ndarray] = []
    for part in (path, path.with_name(path.name + "-wal")):
        if part.exists():
            arrays += npy_int_arrays(part.read_bytes())
    forgotten, shared = truth.by_user(truth.forgotten), truth.by_user(truth.shared)
    revealing = sum(any(items <= set(array.tolist()) <= shared.get(user, set())
                        for user, items in forgotten.items()) for array in arrays)
    findings.append(Finding("superlink.db and WAL bytes",
                            "device uploads holding forgotten items", revealing))
    return findings
