"""Smoke test of the ML-1M benchmark on a tiny dataset: figures exist, no timing is checked."""

from __future__ import annotations

import json
import time

import psutil
import pytest

from fedshare.data.synthetic import synthetic_prepared
from fedshare.federated.config import FederatedConfig
from simulations import bench
from simulations.processes import tree_memory


@pytest.fixture(scope="module")
def data():
    return synthetic_prepared(60, 200, 2_400, seed=1)


CONFIG = FederatedConfig(local_epochs=2, server_steps=2, server_batch_size=64)


def test_client_throughput_compares_modes_on_the_same_users(data):
    figures = bench.client_throughput(data, CONFIG, per_user_sample=5)
    assert figures["users"] > 5 and figures["per_user_sample"] == 5
    for key in ("cohort_updates_per_s", "per_user_updates_per_s", "cohort_speedup",
                "per_user_extrapolated_seconds"):
        assert figures[key] > 0
    assert figures["modes_agree"], figures["modes_max_abs_diff"]


def test_propagation_matches_pyg(data):
    figures = bench.propagation(data, dim=8, repeats=2)
    assert figures["outputs_agree"], figures["outputs_max_abs_diff"]
    assert figures["edges"] == 2 * len(data.split.train) and figures["layers"] == 3
    assert figures["fedshare_ms"] > 0 and figures["pyg_lightgcn_ms"] > 0


def test_learning_round_trains_every_user(data):
    figures = bench.learning_round(data, CONFIG)
    trainable = (data.plan.local(data.split.train).user_degrees() > 0).sum()
    assert figures["users_trained"] == trainable
    assert figures["round_seconds"] > 0 and figures["server_refinement_seconds"] > 0


def test_main_quick_run_prints_and_writes_figures(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "QUICK_SIZE", {"num_users": 40, "num_items": 150,
                                              "num_interactions": 1_600})
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--per-user-sample", "3", "--repeats", "1", "--dim", "8",
                       "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    figures = json.loads(out.read_text())
    assert set(figures) == {"environment", "data", "client_throughput", "propagation",
                            "learning_round", "full_run"}  # --quick skips the ML-100K parts
    assert figures["full_run"]["learn_seconds"] > 0
    assert 0 <= figures["full_run"]["test_hr@20_after_unlearning"] <= 1
    assert "synthetic" in figures["data"]["data"] and figures["data"]["users"] == 40
    assert figures["learning_round"]["peak_rss_mb"] > 0
    assert "cohort_updates_per_s" in printed and "pyg_over_fedshare" in printed


def test_tree_memory_counts_this_process_and_its_children():
    import os
    import subprocess
    import sys

    alone = tree_memory(os.getpid())
    assert alone.rss > 10 * 2**20 and 0 < alone.pss <= alone.rss
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) as child:
        try:
            time.sleep(0.5)  # the child's interpreter is resident by now
            own = psutil.Process().memory_info().rss
            mine, its = tree_memory(os.getpid()), tree_memory(child.pid)
            assert its.rss > 2**20 and its.pss > 0
            assert mine.rss >= own + its.rss - 2**20  # the child's memory is summed in
        finally:
            child.kill()
    assert tree_memory(child.pid) == (0, 0)  # a process that is gone counts nothing


def test_main_job_runs_its_commands_and_measures_them(tmp_path):
    figures = bench.main_job(tmp_path, [["fedshare", "data", "stats", "--dataset", "ml-100k"]])
    assert figures["wall_seconds"] > 0 and figures["peak_tree_rss_mb"] > 0
    assert "943" in (tmp_path / "main-job.log").read_text().replace(",", "")
    with pytest.raises(RuntimeError):
        bench.main_job(tmp_path, [["fedshare", "data", "stats", "--dataset", "nope"]])


def test_main_job_is_what_make_demo_runs():
    from pathlib import Path

    makefile = (Path(__file__).parent.parent / "Makefile").read_text()
    recipe = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    commands = [line.strip().split()[1:] for line in recipe.splitlines()[1:]]
    assert [["fedshare", *c] for c in commands] == [list(c) for c in bench.MAIN_JOB]


def test_flower_modes_compare_cohorts_with_one_node_per_user():
    figures = bench.flower_modes(num_users=6, seed=0)
    assert figures["cohort_nodes"] == 2 and figures["per_user_nodes"] == 6
    for mode in ("cohort", "per_user"):
        assert figures[f"{mode}_round_seconds"] > 0 and figures[f"{mode}_updates_per_s"] > 0
        # the train phase (messages + local training) is part of the round
        assert 0 < figures[f"{mode}_train_seconds"] <= figures[f"{mode}_round_seconds"]
        assert figures[f"{mode}_server_seconds"] >= 0
    assert figures["cohort_over_per_user"] > 0
