"""``fedshare reproduce`` end to end on its ``--quick`` configuration: every figure's code
runs, the report is written, Ctrl-C leaves a folder that resumes without recomputing, bad
input is one line and exit 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from simulations.cli import main

FIGURES = ("learning_curves.png", "fig4_time_storage.png", "fig5_sweeps.png", "cau_plane.png",
           "table3_bars.png")
CSVS = ("learning", "curves", "unlearning", "sweep_users", "sweep_lambda", "sweep_snapshots",
        "sweep_gamma", "cau", "tuning")


def _folder(root: Path) -> Path:
    (folder,) = root.glob("reproduce-*")
    return folder


def test_quick_all_writes_every_table_figure_and_the_report(tmp_path, capsys):
    assert main(["reproduce", "all", "--quick", "--workers", "1", "--out", str(tmp_path)]) == 0
    folder = _folder(tmp_path)
    for name in CSVS:
        assert len(pd.read_csv(folder / f"{name}.csv")) > 0, name
    for name in FIGURES:
        assert (folder / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    report = (folder / "report.md").read_text()
    for section in ("## Protocol", "## Table III", "## Table IV", "## Fig. 4", "## Fig. 5",
                    "## Learning curves", "## CAU Tables 1-4", "## Claims"):
        assert section in report, section
    for name in FIGURES:
        assert f"(figures/{name})" in report
    chosen = json.loads((folder / "chosen.json").read_text())
    assert {"tau", "lambda1"} <= set(chosen["learning"]["fedshare"])
    assert {"tau", "snapshots"} <= set(chosen["unlearning"]["fedshare"])
    learning = pd.read_csv(folder / "learning.csv")
    assert set(learning["method"]) == {"fedshare", "fedshare-fedavg", "pdc-frs", "cdcgnnfed",
                                       "wo-cl", "wo-bpr", "no-sharing"}
    # the Table IV ablations ran at FedShare's chosen learning settings: w/o BPR differs
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["reported_plans"] == ["0:0"] and manifest["tuning_plans"] == ["100:100"]
    assert "report:" in capsys.readouterr().out


def test_ctrl_c_leaves_a_folder_that_resumes_without_recomputing(tmp_path, capsys):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "simulations.cli", "reproduce", "table4", "--quick",
         "--workers", "1", "--out", str(tmp_path)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=env, text=True)
    deadline = time.monotonic() + 240
    cells: list[Path] = []
    while time.monotonic() < deadline and process.poll() is None:
        cells = sorted(tmp_path.glob("reproduce-*/cells/*.json"))
        if len(cells) >= 2:
            break
        time.sleep(0.2)
    assert len(cells) >= 2, "no cell finished in time"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1] == "fedshare: interrupted"
    folder = _folder(tmp_path)
    assert not (folder / "report.md").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in (folder / "cells").glob("*.json")}
    assert main(["reproduce", "table4", "--quick", "--workers", "1", "--resume",
                 str(folder)]) == 0
    again = {p.name: p.stat().st_mtime_ns for p in (folder / "cells").glob("*.json")}
    assert all(again[name] == mtime for name, mtime in kept.items())  # none recomputed
    assert len(again) > len(kept)
    assert (folder / "report.md").is_file()
    sessions = json.loads((folder / "sessions.json").read_text())["sessions"]
    assert len(sessions) == 2
    # a third sitting has nothing left to compute and rewrites the same tables
    before = (folder / "learning.csv").read_text()
    assert main(["reproduce", "table4", "--quick", "--workers", "1", "--resume",
                 str(folder)]) == 0
    assert (folder / "learning.csv").read_text() == before
    capsys.readouterr()


@pytest.mark.parametrize("argv, message", [
    (["reproduce", "all", "--seeds", "0"], "--seeds"),
    (["reproduce", "all", "--workers", "0"], "--workers"),
    (["reproduce", "table3", "--dataset", "nope"], "unknown dataset"),
    (["reproduce", "fig9"], "invalid choice"),
    (["reproduce", "all", "--resume", "/nonexistent/folder"], "not a reproduce folder"),
])
def test_bad_input_is_one_line_exit_2_and_makes_no_folder(tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_folder_resumes_only_with_its_own_design(tmp_path, capsys):
    folder = tmp_path / "made"
    folder.mkdir()
    (folder / "design.json").write_text(json.dumps(
        {"target": "table4", "dataset": "ml-100k", "data_path": None, "seeds": [0],
         "quick": True, "tuning_plans": ["100:100"]}))
    assert main(["reproduce", "table3", "--quick", "--resume", str(folder)]) == 2
    assert "was made for" in capsys.readouterr().err


def test_another_dataset_from_its_published_files(tmp_path, capsys, offline):
    """ML-1M's ``ratings.dat`` format from a local folder: the runs read it, and the report
    sets the paper's own ML-1M column beside ours (no "nearest")."""
    import numpy as np

    rng = np.random.default_rng(0)
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    lines = [f"{u}::{i}::{int(rng.integers(1, 6))}::{978300000 + k}"
             for k, (u, i) in enumerate((u, i) for u in range(1, 61)
                                        for i in rng.choice(np.arange(1, 81), 30, replace=False))]
    (folder / "ratings.dat").write_text("\n".join(lines) + "\n")
    assert main(["reproduce", "fig4", "--quick", "--workers", "1", "--dataset", "ml-1m",
                 "--path", str(folder), "--out", str(tmp_path / "out")]) == 0
    out = _folder(tmp_path / "out")
    assert json.loads((out / "manifest.json").read_text())["dataset"] == "ml-1m"
    report = (out / "report.md").read_text()
    assert "paper, ML-1M" in report and "nearest" not in report
    unlearning = pd.read_csv(out / "unlearning.csv")
    assert set(unlearning["method"]) >= {"fedshare", "fru", "cufru", "retrain"}
    capsys.readouterr()
