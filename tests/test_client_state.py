"""A device's saved state goes back to the server's last committed round when a stopped run is
resumed: the rounds after it are run again, so a node must not have trained in them already.
The embeddings after round r are the vector [r, r] here, so the state restored names the round
it belongs to."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from flwr.app import Context, RecordDict

from clients import app
from fedshare.protocol import RunMark


def _context(state_dir) -> Context:
    return Context(1, 7, {"partition-id": 0, "num-partitions": 1}, RecordDict(),
                   {"client-state-dir": str(state_dir)})


def _train(context: Context, key: str, rounds_committed: list[tuple[int, int]]) -> None:
    """Train in each ``round`` after the server committed ``committed``; the embeddings after
    round r are [r, r]."""
    for round_, committed in rounds_committed:
        mark = RunMark(key, committed)
        app._restore(context, mark)
        previous = (context.state[app.STATE]["user-embeddings"].numpy().copy()
                    if app.STATE in context.state else np.zeros((1, 2), np.float32))
        trained = SimpleNamespace(embeddings=torch.full((1, 2), float(round_)))
        app._save(trained, context, mark, round_, previous)


def _restored(state_dir, mark: RunMark) -> float | None:
    context = _context(state_dir)  # a new run: a new context, only the file is left
    app._restore(context, mark)
    if app.STATE not in context.state:
        return None
    return float(context.state[app.STATE]["user-embeddings"].numpy()[0, 0])


def test_a_restarted_node_returns_to_the_last_committed_round(tmp_path):
    # learning rounds 1-3 (each committed before the next), then two remaining-data rounds of
    # an unlearning phase, committed only when the phase ends
    _train(_context(tmp_path), "run", [(1, 0), (2, 1), (3, 2), (4, 3), (5, 3)])
    assert _restored(tmp_path, RunMark("run", 3)) == 3  # the phase is run again from round 3
    assert _restored(tmp_path, RunMark("run", 4)) == 4
    assert _restored(tmp_path, RunMark("run", 5)) == 5  # everything was committed
    assert _restored(tmp_path, RunMark("other-run", 5)) is None  # another run's state: ignored


def test_rounds_a_node_sat_out_do_not_count(tmp_path):
    _train(_context(tmp_path), "run", [(1, 0), (4, 3)])  # not sampled in rounds 2 and 3
    assert _restored(tmp_path, RunMark("run", 3)) == 1  # after round 3 = after round 1
    assert _restored(tmp_path, RunMark("run", 4)) == 4


def test_the_saved_history_holds_only_uncommitted_rounds(tmp_path):
    context = _context(tmp_path)
    _train(context, "run", [(1, 0), (2, 1), (3, 2)])
    with np.load(tmp_path / "partition-0-of-1.npz") as saved:
        assert saved["history-rounds"].tolist() == [3]
        assert saved["history"][0, 0, 0] == 2  # the embeddings from before round 3
    _train(context, "run", [(4, 3), (5, 3), (6, 3)])
    with np.load(tmp_path / "partition-0-of-1.npz") as saved:
        assert saved["history-rounds"].tolist() == [4, 5, 6]


def test_a_mark_without_a_committed_round_restores_the_latest_state(tmp_path):
    _train(_context(tmp_path), "run", [(1, 0), (2, 0)])
    assert _restored(tmp_path, RunMark("run", -1)) == 2
