"""The server's SQLite store: committed state survives reopening, half-written rounds never
appear, acknowledged unsharing requests are never lost and never served twice."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sqlite3

import numpy as np
import pytest
import torch

from fedshare.data.interactions import Interactions
from fedshare.federated.state_db import StateDB

NUM_USERS, NUM_ITEMS, DIM = 6, 9, 4


def _shared() -> Interactions:
    return Interactions.from_arrays(np.array([0, 0, 2, 5]), np.array([1, 3, 3, 8]),
                                    NUM_USERS, NUM_ITEMS)


def _pairs(interactions: Interactions) -> set[tuple[int, int]]:
    return set(zip(interactions.users.tolist(), interactions.items.tolist(), strict=True))


@pytest.fixture
def path(tmp_path):
    return tmp_path / "state.db"


def test_committed_round_survives_reopening(path):
    store = StateDB(path, NUM_USERS, NUM_ITEMS)
    store.set_shared(_shared())
    table = torch.randn(NUM_ITEMS, DIM)
    snapshots = [torch.randn(NUM_ITEMS, DIM) for _ in range(3)]
    store.commit_round(7, table, snapshots)
    store.close()
    again = StateDB(path, NUM_USERS, NUM_ITEMS)
    assert again.last_round() == 7
    assert torch.equal(again.model(), table)
    assert all(torch.equal(a, b) for a, b in zip(again.snapshots(), snapshots, strict=True))
    assert _pairs(again.shared()) == _pairs(_shared())


def test_a_fresh_store_is_empty_and_the_catalogue_is_checked(path):
    store = StateDB(path, NUM_USERS, NUM_ITEMS)
    assert store.last_round() == 0 and store.model() is None and store.snapshots() == []
    store.close()
    with pytest.raises(ValueError, match="catalogue"):
        StateDB(path, NUM_USERS + 1, NUM_ITEMS)


def test_a_failed_round_commit_leaves_the_previous_round(path):
    store = StateDB(path, NUM_USERS, NUM_ITEMS)
    first = torch.randn(NUM_ITEMS, DIM)
    store.commit_round(1, first, [first])

    broken = torch.randn(NUM_ITEMS, DIM)
    with pytest.raises(AttributeError):
        store.commit_round(2, broken, [broken, "not a tensor"])  # fails half-way
    assert store.last_round() == 1 and torch.equal(store.model(), first)
    assert len(store.snapshots()) == 1


def _die_mid_round(path: str) -> None:
    """Open a round's transaction, write the table, then die without committing."""
    store = StateDB(path, NUM_USERS, NUM_ITEMS)
    store._db.execute("BEGIN IMMEDIATE")
    store._db.execute("DELETE FROM tables")
    store._db.execute("INSERT OR REPLACE INTO meta VALUES ('round', '99')")
    os._exit(1)  # a crash: no rollback, no close


def test_a_crash_mid_round_is_invisible_after_restart(path):
    store = StateDB(path, NUM_USERS, NUM_ITEMS)
    table = torch.randn(NUM_ITEMS, DIM)
    store.commit_round(4, table, [table])
    store.close()
    process = multiprocessing.get_context("fork").Process(target=_die_mid_round,
                                                           args=(str(path),))
    process.start()
    process.join(30)
    assert process.exitcode == 1
    again = StateDB(path, NUM_USERS, NUM_ITEMS)
    assert again.last_round() == 4 and torch.equal(again.model(), table)


def test_requests_are_never_lost_and_never_served_twice(path):
    store = StateDB(path, NUM_USERS, NUM_ITEMS)
    store.set_shared(_shared())
    first = store.acknowledge(0, np.array([1, 3])).id
    store.close()
    store = StateDB(path, NUM_USERS, NUM_ITEMS)  # restart: the acknowledged request is there
    (request,) = store.pending()
    assert (request.id, request.user, request.items.tolist()) == (first, 0, [1, 3])
    second = store.acknowledge(5, np.array([8])).id
    store.serve(store.pending())
    assert store.pending() == []
    assert _pairs(store.shared()) == {(2, 3)}
    store.set_shared(Interactions.from_arrays(np.array([0]), np.array([1]), NUM_USERS,
                                              NUM_ITEMS))  # (0, 1) shared again later
    store.serve([request])  # already served: a replay changes nothing
    assert _pairs(store.shared()) == {(0, 1)}
    assert second > first


def test_a_repeated_request_is_the_logged_one_and_is_served_once(path):
    store = StateDB(path, NUM_USERS, NUM_ITEMS)
    store.set_shared(_shared())
    first = store.acknowledge(0, np.array([3, 1, 3]))
    assert first.items.tolist() == [1, 3] and not first.served
    same = store.acknowledge(0, np.array([1, 3]))  # the same request, spelt otherwise
    assert (same.id, same.items.tolist(), same.served) == (first.id, [1, 3], False)
    assert store.acknowledge(2, np.array([1, 3])).id != first.id  # another user's
    store.serve(store.pending())
    again = store.acknowledge(0, np.array([1, 3]))  # a device repeats it after a restart
    assert (again.id, again.served) == (first.id, True)
    assert store.pending() == [] and store.served_count() == 2


def test_server_state_is_committed_with_its_round(path):
    store = StateDB(path, NUM_USERS, NUM_ITEMS)
    key = store.run_key
    table = torch.randn(NUM_ITEMS, DIM)
    state = {"user": torch.randn(NUM_USERS, DIM), "step": torch.tensor([[3.0]])}
    store.commit_round(2, table, [table], state)
    with pytest.raises(ValueError, match="2-D"):
        store.commit_round(3, table, [table], {"bad": torch.zeros(3)})
    store.close()
    again = StateDB(path, NUM_USERS, NUM_ITEMS)
    assert again.run_key == key and again.last_round() == 2
    restored = again.state()
    assert set(restored) == {"user", "step"}
    assert all(torch.equal(restored[k], v) for k, v in state.items())
    assert StateDB(path.with_name("other.db"), NUM_USERS, NUM_ITEMS).run_key != key


def test_a_file_that_is_not_a_database_is_a_clear_error(path):
    path.write_bytes(b"not a database at all" * 100)
    with pytest.raises(ValueError, match="not a FedShare state database"):
        StateDB(path, NUM_USERS, NUM_ITEMS)


def test_served_interactions_leave_no_copy_in_the_database_or_its_wal(path):
    """Every shared row is a SQLite record holding the user and item as big-endian integers;
    ids of 3 and 4 bytes make each pair a byte string that occurs nowhere else."""
    user, kept, gone = 0x7A3B5C, 0x6D4E2F1A, 0x5B3C1D0E
    def pattern(item: int) -> bytes:
        return user.to_bytes(3, "big") + item.to_bytes(4, "big")

    def on_disk() -> bytes:
        return b"".join(p.read_bytes() for p in (path, path.with_name(path.name + "-wal"))
                        if p.exists())

    store = StateDB(path, user + 1, kept + 1)
    store.set_shared(Interactions.from_arrays(np.array([user, user]), np.array([kept, gone]),
                                              user + 1, kept + 1))
    store.commit_round(1, torch.zeros(3, DIM), [])
    store.serve([store.acknowledge(user, np.array([gone]))])
    data = on_disk()  # while the server runs, and after it closed the store
    store.close()
    for found in (data, on_disk()):
        assert pattern(kept) in found  # the search finds a row that is there
        assert pattern(gone) not in found


def test_serving_rebuilds_the_file_so_no_page_keeps_old_space(path):
    """Secure deletion zeroes freed cells but not the unallocated middle of a page that a
    rebalance rebuilt (a served pair was found there on ML-100K): serving rebuilds the file
    (no free page left) and empties the WAL."""
    rng = np.random.default_rng(0)
    pairs = np.unique(np.stack([rng.integers(0, NUM_USERS, 400),
                                rng.integers(0, 5000, 400)], 1), axis=0)
    users, items = pairs[:, 0], pairs[:, 1]
    store = StateDB(path, NUM_USERS, 5000)
    store.set_shared(Interactions.from_arrays(users, items, NUM_USERS, 5000))
    store.commit_round(1, torch.zeros(3, DIM), [])
    store.serve([store.acknowledge(u, items[users == u][::2]) for u in range(NUM_USERS)])
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA freelist_count").fetchone()[0] == 0
    assert path.with_name(path.name + "-wal").stat().st_size == 0
    store.close()


def test_a_served_request_keeps_no_item_id_and_is_still_recognised(path):
    """After serving, the log holds digests, not items: the served items' int64 ids occur
    nowhere in the database or its WAL, yet a repeat is recognised and served items are left
    out of a larger request. Without the key file the digests link to nothing."""
    items = np.array([0x5B3C1D0E, 0x6D4E2F1A])
    num_items = int(items.max()) + 1
    store = StateDB(path, NUM_USERS, num_items)
    store.set_shared(Interactions.from_arrays(np.array([1, 1, 1]), np.array([*items, 5]),
                                              NUM_USERS, num_items))
    pending = store.acknowledge(1, items)
    assert store.pending()[0].items.tolist() == sorted(items.tolist())
    store.serve([pending])
    (row,) = store._db.execute("SELECT items, count, served FROM requests").fetchall()
    assert row[0] is None and row[1] == 2 and row[2] is not None
    again = store.acknowledge(1, items[::-1])  # the device repeats it, spelt otherwise
    assert again.id == pending.id and again.served and store.pending() == []
    assert store.unserved(1, np.array([*items, 5])).tolist() == [5]
    store.close()
    assert oct(store.key_path.stat().st_mode & 0o777) == "0o600"
    on_disk = b"".join(p.read_bytes() for p in path.parent.iterdir() if p.name != "state.db.key")
    for item in items:
        assert int(item).to_bytes(8, "little") not in on_disk
    store.key_path.unlink()  # the operator drops the key after the run
    store = StateDB(path, NUM_USERS, num_items)
    assert store.find(1, items) is None and store.unserved(1, items).tolist() == sorted(items)
    store.close()


def test_a_database_with_an_older_request_log_is_a_clear_error(path):
    import sqlite3

    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE requests (id INTEGER PRIMARY KEY, user INTEGER, items BLOB)")
        db.commit()
    with pytest.raises(ValueError, match="predates keyed digests"):
        StateDB(path, NUM_USERS, NUM_ITEMS)


def test_metrics_rows_commit_with_their_round_and_scores_are_kept(path):
    store = StateDB(path, NUM_USERS, NUM_ITEMS)
    table = torch.randn(NUM_ITEMS, DIM)
    store.commit_round(1, table, [], row={"round": 1, "num-users": 3})
    store.add_row("validation", 2, {"round": 2, "valid_hr@20": 0.5})
    store.commit_round(2, table, [], row={"round": 2, "num-users": 4})
    with pytest.raises(ValueError):  # a failed commit keeps no row either
        store.commit_round(3, torch.randn(NUM_ITEMS), [], row={"round": 3})
    assert store.scores(2) is None
    store.set_scores(2, {"test": {"hr@20": 0.25}})
    store.close()
    again = StateDB(path, NUM_USERS, NUM_ITEMS)
    assert [r["round"] for r in again.rows("round")] == [1, 2]
    assert again.rows("validation") == [{"round": 2, "valid_hr@20": 0.5}]
    assert again.scores(2) == {"test": {"hr@20": 0.25}} and again.last_round() == 2
