"""`fedshare storage`: the storage/time study end to end on a tiny prepared dataset."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from synthetic import tiny_prepared

from simulations.cli import main

NUM_ITEMS, DIM = 40, 8


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    prepared = tiny_prepared(12, NUM_ITEMS, 0, unshare_user_fraction=0.5).save(root / "data")
    code = main(["storage", "--set", f"prepared={prepared}", "--set", "rounds=3",
                 "--set", "fraction=0.5", "--set", f"dim={DIM}", "--set", "server-batch-size=64",
                 "--set", "server-steps=2", "--snapshots", "1,2", "--out", str(root / "runs")])
    assert code == 0
    (folder,) = (root / "runs").iterdir()
    return folder


def test_writes_every_output(study):
    for name in ("storage_study.csv", "storage_study.md", "summary.json"):
        assert (study / name).stat().st_size > 0
    for name in ("storage.png", "time.png"):
        assert (study / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bytes_follow_each_method(study):
    frame = pd.read_csv(study / "storage_study.csv").set_index("label")
    assert list(frame.index) == ["FedShare (M=1)", "FedShare (M=2)", "FRU",
                                 "FRU (learning sampling)", "CUFRU", "Retrain"]
    for m in (1, 2):  # M snapshots of I x d float32, all on the server
        row = frame.loc[f"FedShare (M={m})"]
        assert row["kept_bytes"] == row["server_bytes"] == m * NUM_ITEMS * DIM * 4
        assert row["client_bytes"] == 0
    assert frame.loc["FRU", "client_bytes"] > 0 and frame.loc["FRU", "server_bytes"] > 0
    # the paper's candidates are a subset of every touched row; the server's store is the same
    learning = frame.loc["FRU (learning sampling)"]
    assert 0 < frame.loc["FRU", "client_bytes"] < learning["client_bytes"]
    assert frame.loc["FRU", "server_bytes"] == learning["server_bytes"]
    assert 0 < frame.loc["FRU", "per_client_bytes"] < learning["per_client_bytes"]
    assert (frame["table_bytes"] == NUM_ITEMS * DIM * 4).all()
    assert (frame.drop(index=["FRU", "FRU (learning sampling)"])["per_client_bytes"] == 0).all()
    assert frame.loc["CUFRU", "client_bytes"] == 0 and frame.loc["CUFRU", "server_bytes"] > 0
    assert frame.loc["Retrain", "kept_bytes"] == 0
    assert (frame["client_bytes"] + frame["server_bytes"] == frame["kept_bytes"]).all()
    assert (frame["seconds"] > 0).all()
    assert frame["test_hr@20"].between(0, 1).all()


def test_summary_ratios_come_from_the_table(study):
    frame = pd.read_csv(study / "storage_study.csv").set_index("label")
    ratios = json.loads((study / "summary.json").read_text())["ratios"]
    for m in (1, 2):
        for other in ("FRU", "FRU (learning sampling)", "CUFRU"):
            assert ratios[f"bytes FedShare (M={m}) / {other}"] == pytest.approx(
                frame.loc[f"FedShare (M={m})", "kept_bytes"] / frame.loc[other, "kept_bytes"])
    for label in ("FRU", "FRU (learning sampling)"):
        assert ratios[f"per-client KiB {label}"] == pytest.approx(
            frame.loc[label, "per_client_bytes"] / 1024)
        assert ratios[f"per-client / item table {label}"] == pytest.approx(
            frame.loc[label, "per_client_bytes"] / (NUM_ITEMS * DIM * 4))
    summary = json.loads((study / "summary.json").read_text())
    assert summary["fru"] == {"alpha": 0.5, "beta": 0.5, "pool": 0.1, "sampling": "paper"}
    assert ratios["seconds FRU / Retrain"] == pytest.approx(
        frame.loc["FRU", "seconds"] / frame.loc["Retrain", "seconds"])


@pytest.mark.parametrize("argv", [["--snapshots", "0"], ["--alpha", "2"], ["--interval", "0"],
                                  ["--beta", "0"], ["--pool", "1.5"],
                                  ["--set", "prepared=/nonexistent/fedshare"]])
def test_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, argv):
    code = main(["storage", *argv, "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("fedshare: error:")
    assert not (tmp_path / "runs").exists()


def test_the_summary_names_the_plans(study):
    summary = json.loads((study / "summary.json").read_text())
    assert [p["dataset"] for p in summary["reported_plans"]] == ["synthetic"]
    assert "fedshare" in summary["tuning_plans"] and not summary["reported_on_a_tuning_plan"]
