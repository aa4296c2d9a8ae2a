"""The erasure audit finds nothing in a run that erased what it had to, and finds what a test
plants in each store it checks (so the audit can fail)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

from fedshare.data.interactions import Interactions
from fedshare.federated.state_db import StateDB
from fedshare.unlearning.residue import GroundTruth, audit_run, recorded_pairs
from simulations.cli import main

NUM_USERS, NUM_ITEMS, DIM = 300, 2000, 4
SHARED = [(0, 1), (5, 300), (200, 7), (299, 1999)]
FORGOTTEN = [(5, 301), (200, 1500)]
LOCAL = [(0, 2), (5, 302), (250, 1700)]
TRUTH = GroundTruth(set(FORGOTTEN), set(LOCAL))


def _interactions(pairs) -> Interactions:
    users, items = zip(*pairs, strict=True)
    return Interactions.from_arrays(np.array(users), np.array(items), NUM_USERS, NUM_ITEMS)


@pytest.fixture
def run(tmp_path) -> Path:
    """A run folder whose server shared SHARED + FORGOTTEN, then served the requests."""
    store = StateDB(tmp_path / "state.db", NUM_USERS, NUM_ITEMS)
    store.set_shared(_interactions(SHARED + FORGOTTEN))
    table = torch.randn(NUM_ITEMS, DIM)
    store.commit_round(1, table, [torch.randn(NUM_ITEMS, DIM), table.clone()])
    requests = [store.acknowledge(u, np.array([i])) for u, i in FORGOTTEN]
    store.serve(requests, (2, table, [table.clone()], {}))
    store.close()
    return tmp_path


def _found(folder: Path) -> dict[str, int]:
    return {f"{f.place}: {f.what}": f.found for f in audit_run(folder, TRUTH)}


def test_a_clean_run_has_nothing_to_report(run):
    found = _found(run)
    assert len(found) == 8 and set(found.values()) == {0}


def _sql(run: Path, *statements: str) -> None:
    with sqlite3.connect(run / "state.db") as db:
        db.execute("PRAGMA secure_delete=OFF")
        for statement in statements:
            db.execute(statement)


@pytest.mark.parametrize(("plant", "where"), [
    (["INSERT INTO shared VALUES (5, 301)"], "state.db shared (D_s): forgotten pairs"),
    (["INSERT INTO shared VALUES (250, 1700)"],
     "state.db shared (D_s): local-only interactions"),
    (["UPDATE requests SET items = x'2d01000000000000'"],
     "state.db request log: item ids of served requests"),
    (["INSERT INTO tables VALUES ('snapshot', 1, 1, 1, x'00000000')"],
     "state.db snapshots: pre-request snapshots"),
    (["INSERT INTO requests (user, digest, item_digests, count, items, received) "
      "VALUES (9, x'00', x'00', 1, x'0100000000000000', 0)"],
     "state.db request log: requests not yet served"),
])
def test_residue_planted_in_each_store_is_found(run, plant, where):
    _sql(run, *plant)
    found = _found(run)
    assert found[where] >= 1
    assert main(["audit", str(run), "--devices", str(run)]) == 2  # no device files: error


def test_a_deleted_row_left_in_an_old_wal_frame_is_found(run):
    """A server that deletes a served pair but never checkpoints: the WAL keeps the page as
    it was, with the row in it, while the server runs."""
    db = sqlite3.connect(run / "state.db", isolation_level=None)
    try:
        db.execute("INSERT INTO shared VALUES (200, 1500)")
        db.execute("DELETE FROM shared WHERE item = 1500")
        assert _found(run)["state.db and WAL bytes: records of forgotten pairs"] == 1
    finally:
        db.close()  # the last connection checkpoints: the old frame is gone
    assert _found(run)["state.db and WAL bytes: records of forgotten pairs"] == 0


def test_an_unknown_file_in_the_run_folder_is_reported(run):
    (run / "dump.bin").write_bytes(b"x")
    assert _found(run)["run folder: files no run writes"] == 1


def test_the_cell_decoder_reads_every_live_row(tmp_path):
    pairs = {(0, 1), (1, 0), (5, 300), (942, 1681), (70000, 3), (2**31, 2)}
    with sqlite3.connect(tmp_path / "x.db") as db:
        db.execute("CREATE TABLE shared (user INTEGER NOT NULL, item INTEGER NOT NULL, "
                   "PRIMARY KEY (user, item))")
        db.executemany("INSERT INTO shared VALUES (?, ?)", sorted(pairs))
    assert recorded_pairs((tmp_path / "x.db").read_bytes()) >= pairs


def test_the_command_exits_non_zero_on_residue_and_zero_when_clean(run, capsys,
                                                                   monkeypatch):
    import simulations.cli as cli
    from fedshare.unlearning import residue

    monkeypatch.setattr(residue.GroundTruth, "from_plan", classmethod(lambda cls, data: TRUTH))
    monkeypatch.setattr("fedshare.runconfig.load_data", lambda key: None)
    (run / "config.toml").write_text('dataset = "ml-100k"\n')
    assert cli.main(["audit", str(run)]) == 0
    assert "0 found in 8 checks" in capsys.readouterr().out
    _sql(run, "INSERT INTO shared VALUES (5, 301)")
    assert cli.main(["audit", str(run)]) == 1
    assert main(["audit", str(run / "nowhere")]) == 2


def _npy(values) -> bytes:
    import io

    out = io.BytesIO()
    np.save(out, np.asarray(values, dtype=np.int64), allow_pickle=False)
    return out.getvalue()


def _superlink(path: Path, secure: bool, keep: bool = False) -> Path:
    """A stand-in for Flower's SuperLink database: a device's share reply (user 3 shared items
    5, 9 and 12, then unshared 9 and 12) stored as a message object, then deleted."""
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA secure_delete={'ON' if secure else 'OFF'}")
        db.execute("CREATE TABLE objects (id TEXT PRIMARY KEY, content BLOB)")
        db.execute("CREATE TABLE message_res (id TEXT PRIMARY KEY, content BLOB)")
        db.execute("INSERT INTO objects VALUES ('a', ?)", (b"x" * 40 + _npy([5, 9, 12]),))
        db.execute("INSERT INTO objects VALUES ('b', ?)", (_npy([1, 2, 3, 4]),))  # a node's ids
        if not keep:
            db.execute("DELETE FROM objects")
    return path


UPLOADS = GroundTruth(forgotten={(3, 9), (3, 12)}, local={(3, 1)},
                    shared={(3, 5), (3, 9), (3, 12)})


def test_a_superlink_upload_left_in_free_pages_is_found(tmp_path):
    from fedshare.unlearning.residue import audit_superlink

    def found(path: Path) -> dict[str, int]:
        return {f.what: f.found for f in audit_superlink(path, UPLOADS)}

    assert found(_superlink(tmp_path / "deleted.db", secure=False)) == {
        "messages left": 0, "device uploads holding forgotten items": 1}
    assert found(_superlink(tmp_path / "wiped.db", secure=True)) == {
        "messages left": 0, "device uploads holding forgotten items": 0}
    assert found(_superlink(tmp_path / "kept.db", secure=True, keep=True)) == {
        "messages left": 2, "device uploads holding forgotten items": 1}


def test_the_npy_reader_finds_integer_arrays_only():
    from fedshare.unlearning.residue import npy_int_arrays

    out = __import__("io").BytesIO()
    np.save(out, np.ones(3, np.float32))
    raw = b"junk" + _npy([7, 8]) + out.getvalue() + _npy([4]) + b"\x93NUMPY broken"
    assert [a.tolist() for a in npy_int_arrays(raw)] == [[7, 8]]  # no floats, no single id


def test_scrubbing_a_superlink_database_leaves_no_upload_behind(tmp_path):
    """What `fedshare deploy` does after every run: the deleted upload the audit finds in free
    pages is gone after the scrub, and the live rows are kept."""
    from fedshare.unlearning.residue import audit_superlink
    from simulations.superlink import scrub_database

    def found(path: Path) -> dict[str, int]:
        return {f.what: f.found for f in audit_superlink(path, UPLOADS)}

    path = _superlink(tmp_path / "superlink.db", secure=False)
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")  # as Flower's SuperLink keeps it
        db.execute("INSERT INTO message_res VALUES ('kept', x'01')")
    assert found(path)["device uploads holding forgotten items"] == 1
    scrub_database(path)
    assert found(path) == {"messages left": 1, "device uploads holding forgotten items": 0}
    scrub_database(tmp_path / "absent.db")  # nothing to scrub, nothing created
    assert not (tmp_path / "absent.db").exists()
