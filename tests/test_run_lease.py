"""One writer per run folder: while a live server holds a run folder's lease, another server
or a resume is refused with one clear line; once the holder is killed its lease is free at once,
with nothing to clean up."""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

import pytest

from fedshare.errors import FedShareError
from fedshare.run_lease import RunLease, ensure_free
from simulations.experiment import leased_folder, record_settings, resolve, run_experiment


def _hold(folder: str, ready) -> None:
    RunLease(folder).acquire()
    ready.set()
    signal.pause()  # until killed: the lease dies with the process


@pytest.fixture
def holder(tmp_path):
    """A live process holding ``tmp_path``'s lease; the test may kill it."""
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    process = context.Process(target=_hold, args=(str(tmp_path), ready), daemon=True)
    process.start()
    assert ready.wait(60)
    yield process
    if process.is_alive():
        os.kill(process.pid, signal.SIGKILL)
    process.join()


def test_a_second_writer_is_refused_while_the_holder_lives(tmp_path, holder):
    with pytest.raises(FedShareError, match=rf"in use by another writer \(pid {holder.pid}\)"):
        RunLease(tmp_path).acquire()
    os.kill(holder.pid, signal.SIGKILL)  # a crash: no clean-up
    holder.join()
    with RunLease(tmp_path), pytest.raises(FedShareError, match="in use"):  # taken over
        ensure_free(tmp_path)  # and now held by us
    ensure_free(tmp_path)  # released on exit


def test_a_resume_is_refused_while_a_server_writes_the_folder(tmp_path, holder):
    experiment = resolve(None, ["rounds=2"])
    record_settings(tmp_path, experiment.run, experiment.num_supernodes)
    Path(tmp_path / "state.db").touch()
    with pytest.raises(FedShareError, match="in use by another writer"):
        run_experiment(experiment, engine="flower", resume=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".lease", "config.toml", "federation.toml", "state.db"]  # nothing was written


def test_a_table_command_holds_its_folder_and_never_shares_one(tmp_path):
    """Two table commands started in the same second get folders of their own; each holds
    its folder's lease while it writes, so a server or a resume pointed there is refused."""
    with leased_folder(tmp_path, "learning-table") as first, \
            leased_folder(tmp_path, "learning-table") as second:
        assert first != second and first.parent == second.parent == tmp_path.resolve()
        with pytest.raises(FedShareError, match="in use by another writer"):
            RunLease(first).acquire()
        record_settings(second, resolve(None, []).run, 2)
        with pytest.raises(FedShareError, match="in use by another writer"):
            run_experiment(resolve(None, []), engine="flower", resume=second)
    ensure_free(first)
    ensure_free(second)
