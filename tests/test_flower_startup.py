"""A Flower run that cannot start fails in one line within a bounded time instead of hanging:
a named Ray cluster that does not answer is refused before anything starts, and a run whose
ServerApp has not begun its share round by the start-up deadline is stopped whole."""

from __future__ import annotations

import time

import pytest
from synthetic import tiny_prepared

from fedshare.errors import FedShareError
from simulations.cli import main
from simulations.experiment import resolve, run_experiment
from simulations.processes import live


def test_a_ray_cluster_that_does_not_answer_is_refused_at_once(tmp_path, capsys):
    folder = tiny_prepared().save(tmp_path / "tiny")
    started = time.monotonic()
    code = main(["run", "--out", str(tmp_path / "runs"), "--set", f"prepared={folder}",
                 "--ray-address", "127.0.0.1:9"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and time.monotonic() - started < 30
    assert err[-1].startswith("fedshare: error: no Ray cluster answers at 127.0.0.1:9")
    assert not (tmp_path / "runs").exists()  # nothing was written


def test_a_bad_startup_timeout_is_refused(capsys):
    assert main(["run", "--startup-timeout", "0"]) != 0
    assert "--startup-timeout must be > 0" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_that_does_not_start_in_time_is_stopped_whole(tmp_path):
    import psutil

    folder = tiny_prepared().save(tmp_path / "tiny")
    experiment = resolve(None, [f"prepared={folder}", "rounds=2", "num-supernodes=2"])
    before = set(psutil.Process().children(recursive=True))
    started = time.monotonic()
    with pytest.raises(FedShareError, match="had not started 1 s after the launch"):
        run_experiment(experiment, tmp_path / "runs", "flower", startup=1.0)
    assert time.monotonic() - started < 60
    left = [p for p in psutil.Process().children(recursive=True) if p not in before and live(p)]
    assert left == []
