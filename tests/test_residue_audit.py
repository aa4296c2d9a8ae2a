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
