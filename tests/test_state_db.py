"""The server's SQLite store: committed state survives reopening, half-written rounds never
appear, acknowledged unsharing requests are never lost and never served twice."""

from __future__ import annotations

import multiprocessing
import os

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
