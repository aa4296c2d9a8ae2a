"""The server's durable state in an embedded SQLite database (``state.db`` of a Flower run).

What a restarted server needs lives here: the shared data D_s, the current item table and the
round it belongs to, the M snapshots, which node speaks for which user, the server's private
state (its user embeddings and the refinement optimiser's moments), and the unsharing-request
log. Every change is one SQLite
transaction, so a round is either fully committed (table, snapshots, server state and round
counter together) or not visible at all, and a request acknowledged by
:meth:`StateDB.acknowledge` survives any crash after the call returns. Serving requests
deletes their interactions from D_s and marks them served in the same transaction: a request is
never served twice, and acknowledging the same request again (a device repeats it after a
restart) returns the request already logged instead of a new one.

Choices: WAL journal with ``synchronous=FULL`` (a committed transaction survives power loss),
``secure_delete`` (deleted rows are overwritten), and after requests are served a ``VACUUM``
(secure deletion leaves deleted cells in the unallocated middle of pages that a rebalance
rebuilt) and a truncating checkpoint (the WAL's copies of the pages before the deletion are
gone);
tensors are stored as raw float32 bytes with their 2-D shape. ``run_key`` is a random id drawn
when the store is created: devices tag their own saved state with it and restore that state only
when a resumed run presents the same key.

The request log keeps a request's items only until it is served. What it keeps for good is what
recognising a repeated request needs: the user, the item count, the times, and keyed digests
(HMAC-SHA256, 16 bytes) of the request's item set and of each of its items, under a per-run
secret kept in its own file (``state.db.key``, owner-only). What that reveals: to a reader of
the database alone, who unshared how many items when, and nothing of which items; to a reader
who also holds the key, whether a given (user, item) was unshared, so by trying the catalogue
the whole request. Deleting the key file after a run leaves only the first.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fedshare.data.interactions import Interactions
from fedshare.errors import FedShareError
from fedshare.federated.config import FederatedConfig
from fedshare.federated.directory import Directory
from fedshare.federated.recording import RoundRecorder
from fedshare.federated.rounds import RunLog
from fedshare.federated.server import Server

RESUMABLE = ("rounds", "eval_every")  # settings a resumed run may change

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS shared (user INTEGER NOT NULL, item INTEGER NOT NULL,
                                   PRIMARY KEY (user, item));
CREATE TABLE IF NOT EXISTS tables (kind TEXT NOT NULL, position INTEGER NOT NULL,
                                   rows INTEGER NOT NULL, cols INTEGER NOT NULL,
                                   data BLOB NOT NULL, PRIMARY KEY (kind, position));
CREATE TABLE IF NOT EXISTS bindings (user INTEGER PRIMARY KEY, node TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requests (id INTEGER PRIMARY KEY AUTOINCREMENT,
                                     user INTEGER NOT NULL, digest BLOB NOT NULL,
                                     item_digests BLOB NOT NULL, count INTEGER NOT NULL,
                                     items BLOB, received REAL NOT NULL, served REAL,
                                     UNIQUE (user, digest));
CREATE TABLE IF NOT EXISTS log (kind TEXT NOT NULL, round INTEGER NOT NULL, row TEXT NOT NULL,
                                PRIMARY KEY (kind, round));
"""
DIGEST = 16  # bytes of a keyed digest kept per request and per item


@dataclass(frozen=True)
class Request:
    """An acknowledged unsharing request."""

    id: int
    user: int
    items: np.ndarray
    served: bool = False


class StateDB:
    """SQLite-backed server state (module docstring).

    Args:
        path: the database file (created if missing; a run directory's ``state.db``).
        num_users, num_items: the catalogue, recorded on creation and checked on reopening.
    """

    def __init__(self, path: str | Path, num_users: int, num_items: int) -> None:
        self.path = Path(path)
        self.num_users, self.num_items = num_users, num_items
        self._db = sqlite3.connect(self.path, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            # deleted rows (served interactions, replaced tables) are overwritten, not left in
            # free pages
            self._db.execute("PRAGMA secure_delete=ON")
            self._db.executescript(SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(requests)")}
            if "digest" not in columns:
                raise sqlite3.DatabaseError("its request log predates keyed digests; "
                                            "use a new out-dir")
            with self._transaction():
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('catalogue', ?)",
                                 (f"{num_users} {num_items}",))
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('run-key', ?)",
                                 (uuid.uuid4().hex,))
            stored = self._meta("catalogue")
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise ValueError(f"{self.path} is not a FedShare state database: {exc}") from None
        if stored != f"{num_users} {num_items}":
            self.close()
            raise ValueError(f"{self.path} holds a catalogue of {stored} (users items), "
                             f"not {num_users} {num_items}")

    def close(self) -> None:
        self._db.close()

    @property
    def key_path(self) -> Path:
        return self.path.with_name(self.path.name + ".key")

    def _key(self) -> bytes:
        """The run's secret for request digests, in its own file beside the database (created
        on first use, readable by the owner only). Without it the log's digests name no item;
        deleting it after a run makes them unlinkable for good (a device repeating a served
        request is then refused as asking for items it no longer shares, which is harmless)."""
        if not hasattr(self, "_secret"):
            try:
                fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                self._secret = self.key_path.read_bytes()
            else:
                self._secret = os.urandom(32)
                with os.fdopen(fd, "wb") as out:
                    out.write(self._secret)
                    out.flush()
                    os.fsync(out.fileno())
        return self._secret

    def _digest(self, user: int, items: np.ndarray) -> bytes:
        """The request's keyed digest: one per (user, set of items)."""
        return hmac.new(self._key(), b"request" + int(user).to_bytes(8, "little") + _blob(items),
                        hashlib.sha256).digest()[:DIGEST]

    def _item_digests(self, user: int, items: np.ndarray) -> list[bytes]:
        key = self._key()
        return [hmac.new(key, b"item" + int(user).to_bytes(8, "little") + int(i).to_bytes(
            8, "little"), hashlib.sha256).digest()[:DIGEST] for i in np.unique(items)]

    @staticmethod
    def catalogue_of(path: str | Path) -> tuple[int, int] | None:
        """The (users, items) an existing store was created for; ``None`` if it has none."""
        try:
            with contextlib.closing(sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True)) as db:
                row = db.execute("SELECT value FROM meta WHERE key = 'catalogue'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"{path} is not a FedShare state database: {exc}") from None
        if row is None:
            return None
        users, items = str(row[0]).split()
        return int(users), int(items)

    @property
    def run_key(self) -> str:
        """The store's random id (module docstring)."""
        return str(self._meta("run-key"))

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def settings(self) -> dict | None:
        """The run settings recorded by :meth:`set_settings` (``None``: a new store)."""
        text = self._meta("settings")
        return None if text is None else dict(json.loads(text))

    def set_settings(self, settings: dict) -> None:
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('settings', ?)",
                             (json.dumps(settings, sort_keys=True),))

    # ------------------------------------------------------------------ who speaks for whom
    def bindings(self) -> dict[int, int]:
        """user -> the node that announced it first (node ids are unsigned 64-bit: TEXT)."""
        return {int(u): int(n) for u, n in self._db.execute("SELECT user, node FROM bindings")}

    def bind(self, user_node: dict[int, int]) -> None:
        """Bind users to nodes; a user already bound keeps its node."""
        with self._transaction():
            self._db.executemany("INSERT OR IGNORE INTO bindings VALUES (?, ?)",
                                 [(int(u), str(int(n))) for u, n in user_node.items()])

    # ------------------------------------------------------------------ D_s
    def set_shared(self, shared: Interactions) -> None:
        """Replace D_s (after the share round)."""
        with self._transaction():
            self._db.execute("DELETE FROM shared")
            self._db.executemany("INSERT INTO shared VALUES (?, ?)",
                                 zip(shared.users.tolist(), shared.items.tolist(), strict=True))

    def shared(self) -> Interactions:
        rows = np.array(self._db.execute("SELECT user, item FROM shared ORDER BY user, item")
                        .fetchall(), dtype=np.int64).reshape(-1, 2)
        return Interactions.from_arrays(rows[:, 0], rows[:, 1], self.num_users, self.num_items)

    # ------------------------------------------------------------------ rounds
    def commit_round(self, round_: int, table: Tensor, snapshots: list[Tensor],
                     state: dict[str, Tensor] | None = None, row: dict | None = None) -> None:
        """The table after ``round_``, the snapshots, the server's private ``state`` (named
        2-D tensors) and the round's ``metrics.csv`` row, all or nothing."""
        with self._transaction():
            self._write_round(round_, table, snapshots, state)
            if row is not None:
                self._write_row("round", round_, row)

    def _write_row(self, kind: str, round_: int, row: dict) -> None:
        self._db.execute("INSERT OR REPLACE INTO log VALUES (?, ?, ?)",
                         (kind, int(round_), json.dumps(row)))

    def add_row(self, kind: str, round_: int, row: dict) -> None:
        """Keep a ``metrics.csv`` row of ``kind`` (``validation``) for ``round_``."""
        with self._transaction():
            self._write_row(kind, round_, row)

    def rows(self, kind: str) -> list[dict]:
        """The kept rows of ``kind`` (``round``, ``validation``), by round: a resumed run's
        ``metrics.csv`` holds the rounds before the restart too."""
        return [json.loads(text) for (text,) in self._db.execute(
            "SELECT row FROM log WHERE kind = ? ORDER BY round", (kind,))]

    def scores(self, round_: int) -> dict | None:
        """The scores of the table of ``round_`` kept by :meth:`set_scores`, if any."""
        text = self._meta(f"scores:{round_}")
        return None if text is None else dict(json.loads(text))

    def set_scores(self, round_: int, scores: dict) -> None:
        """Keep the full scores of the table of ``round_``: a resumed run reports them instead
        of asking devices that may have unshared since."""
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                             (f"scores:{round_}", json.dumps(scores)))

    def _write_round(self, round_: int, table: Tensor, snapshots: list[Tensor],
                     state: dict[str, Tensor] | None = None) -> None:
        self._db.execute("DELETE FROM tables")
        named = [("model", 0, table), *[("snapshot", k, s) for k, s in enumerate(snapshots)],
                 *[(f"state:{name}", 0, t) for name, t in (state or {}).items()]]
        for kind, position, tensor in named:
            array = tensor.detach().numpy().astype(np.float32)
            if array.ndim != 2:
                raise ValueError(f"{kind} is not a 2-D table (shape {array.shape})")
            self._db.execute("INSERT INTO tables VALUES (?, ?, ?, ?, ?)",
                             (kind, position, *array.shape, array.tobytes()))
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('round', ?)", (str(round_),))

    def last_round(self) -> int:
        """The last committed round (0: none)."""
        return int(self._meta("round") or 0)

    def _tables(self, kind: str) -> list[Tensor]:
        rows = self._db.execute("SELECT rows, cols, data FROM tables WHERE kind = ? "
                                "ORDER BY position", (kind,)).fetchall()
        return [torch.from_numpy(np.frombuffer(data, dtype=np.float32).reshape(r, c).copy())
                for r, c, data in rows]

    def model(self) -> Tensor | None:
        tables = self._tables("model")
        return tables[0] if tables else None

    def snapshots(self) -> list[Tensor]:
        return self._tables("snapshot")

    def state(self) -> dict[str, Tensor]:
        """The server's private state committed with the last round."""
        rows = self._db.execute("SELECT kind FROM tables WHERE kind LIKE 'state:%'").fetchall()
        return {kind.removeprefix("state:"): self._tables(kind)[0] for (kind,) in rows}

    # ------------------------------------------------------------------ unsharing requests
    def acknowledge(self, user: int, items: np.ndarray) -> Request:
        """Record an unsharing request durably and return it once committed; the same request
        acknowledged before (pending or served) is returned as it is, not logged again."""
        items = np.unique(np.asarray(items, dtype=np.int64))
        with self._transaction():
            self._db.execute(
                "INSERT OR IGNORE INTO requests (user, digest, item_digests, count, items, "
                "received) VALUES (?, ?, ?, ?, ?, ?)",
                (int(user), self._digest(user, items), b"".join(self._item_digests(user, items)),
                 len(items), _blob(items), time.time()))
        request = self.find(user, items)
        assert request is not None
        return request

    def find(self, user: int, items: np.ndarray) -> Request | None:
        """The logged request of ``user`` for exactly ``items`` (in any order), if any."""
        items = np.unique(np.asarray(items, dtype=np.int64))
        row = self._db.execute("SELECT id, served FROM requests WHERE user = ? AND digest = ?",
                               (int(user), self._digest(user, items))).fetchone()
        return None if row is None else Request(int(row[0]), int(user), items,
                                                row[1] is not None)

    def pending(self) -> list[Request]:
        """Acknowledged requests not yet served: the only ones whose items the log holds."""
        rows = self._db.execute("SELECT id, user, items FROM requests WHERE served IS NULL "
                                "ORDER BY id").fetchall()
        return [Request(i, u, np.frombuffer(b, dtype=np.int64).copy()) for i, u, b in rows]

    def unserved(self, user: int, items: np.ndarray) -> np.ndarray:
        """``items`` (sorted, distinct) less those of ``user``'s served requests, found by
        their keyed digests (the served requests' items themselves are not kept)."""
        items = np.unique(np.asarray(items, dtype=np.int64))
        rows = self._db.execute("SELECT item_digests FROM requests WHERE user = ? AND served "
                                "IS NOT NULL", (int(user),)).fetchall()
        served = {blob[k:k + DIGEST] for (blob,) in rows for k in range(0, len(blob), DIGEST)}
        keep = [d not in served for d in self._item_digests(user, items)]
        return items[np.array(keep, dtype=bool)] if len(items) else items

    def served_count(self) -> int:
        row = self._db.execute("SELECT COUNT(*) FROM requests WHERE served IS NOT NULL")
        return int(row.fetchone()[0])

    def serve(self, requests: list[Request],
              result: tuple[int, Tensor, list[Tensor], dict[str, Tensor]] | None = None
              ) -> None:
        """Delete the requests' interactions from D_s and mark them served, atomically, with
        the unlearned ``(round, table, snapshots, state)`` when given; a request already served
        is skipped."""
        with self._transaction():
            if result is not None:
                self._write_round(*result)
            for request in requests:
                updated = self._db.execute(  # the items go; digests, count and times stay
                    "UPDATE requests SET served = ?, items = NULL WHERE id = ? AND served IS "
                    "NULL", (time.time(), request.id)).rowcount
                if updated:
                    self._db.executemany("DELETE FROM shared WHERE user = ? AND item = ?",
                                         [(request.user, int(i)) for i in request.items])
        # Deleted cells can survive secure_delete in the unallocated middle of a page that a
        # b-tree rebalance rebuilt (the audit found one on ML-100K): rebuild the whole file,
        # then copy the new pages into it and empty the WAL, which held the old ones.
        self._db.execute("VACUUM")
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _blob(items: np.ndarray) -> bytes:
    """A request's items in their one spelling: sorted, distinct, int64."""
    return np.unique(np.asarray(items, dtype=np.int64)).tobytes()


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on any exception."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            try:
                self._db.execute("COMMIT")
                return
            except sqlite3.Error:
                if self._db.in_transaction:  # e.g. busy: leave no transaction open behind us
                    self._db.execute("ROLLBACK")
                raise
        if self._db.in_transaction:  # SQLite may have rolled back already (I/O error, full)
            self._db.execute("ROLLBACK")


class CommitRounds(RoundRecorder):
    """The round hook of a Flower run: each finished round (table, snapshots, the server's
    private state, the round counter and the round's row of ``log``) is committed in one
    transaction."""

    name = "state-db"

    def __init__(self, store: StateDB, server: Server, log: RunLog | None = None) -> None:
        self.store, self.server, self.log = store, server, log

    def committed(self, round_: int, table: Tensor) -> None:
        rows = self.log.rounds if self.log is not None else []
        row = rows[-1] if rows and rows[-1]["round"] == round_ else None
        self.store.commit_round(round_, table, list(self.server.snapshots), self.server.state(),
                                row)


def restore_server(server: Server, store: StateDB) -> int:
    """Continue from the store's last committed round: V_s, snapshots and the server's private
    state as committed. Returns that round (0 for a new store)."""
    last = store.last_round()
    table = store.model()
    if last and table is not None:
        server.load_state(table, store.state())
        for snapshot in store.snapshots():
            server.snapshots.append(snapshot)
    return last


def open_store(path: Path, directory: Directory, config: FederatedConfig,
               bind: bool = True) -> StateDB:
    """The run directory's state database: a new one takes D_s from the share round; an existing
    one (a resumed run) is authoritative for D_s, since requests it served deleted
    interactions the devices still hold. A resumed run must use the same settings, the number
    of rounds and the evaluation period aside. With ``bind``, users newly announced are bound
    to their nodes for good."""
    shared = directory.shared
    try:
        store = StateDB(path, shared.num_users, shared.num_items)
    except ValueError as exc:
        raise FedShareError(str(exc)) from None
    settings = {k: v for k, v in config.to_dict().items() if k not in RESUMABLE}
    stored = store.settings()
    if stored is None:
        store.set_shared(shared)
        store.set_settings(settings)
    elif stored != json.loads(json.dumps(settings)):
        changed = sorted(k for k in settings if stored.get(k) != settings[k])
        store.close()
        raise FedShareError(f"{path} belongs to a run with other settings ({', '.join(changed)})"
                            "; use a new out-dir")
    else:
        directory.shared = store.shared()
    if bind:
        store.bind(directory.user_node)
    return store


def stored_directory(path: Path) -> tuple[tuple[int, int] | None, dict[int, int]]:
    """The catalogue and user bindings of an existing store (a resumed run)."""
    try:
        catalogue = StateDB.catalogue_of(path)
        if catalogue is None:
            return None, {}
        store = StateDB(path, *catalogue)
    except ValueError as exc:
        raise FedShareError(str(exc)) from None
    try:
        return catalogue, store.bindings()
    finally:
        store.close()
