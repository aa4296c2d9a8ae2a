"""``fedshare privacy-audit`` end to end on a tiny dataset: every output, resume, the target."""

from __future__ import annotations

import json

import pandas as pd
from synthetic import tiny_prepared

from simulations.cli import main
from simulations.privacy_audit import SETTINGS


def test_privacy_audit_writes_every_output_and_resumes(tmp_path, capsys):
    folder = tiny_prepared(num_users=60, num_items=120, seed=1).save(tmp_path / "tiny")
    argv = ["privacy-audit", "--set", f"prepared={folder}", "--set", "rounds=3", "--set",
            "dim=8", "--set", "fraction=0.5", "--set", "server-steps=1", "--users", "8",
            "--seeds", "0", "--settings", "device,cohort-3,secagg,secagg+hidden,ldp-1",
            "--out", str(tmp_path / "runs")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    saved = next((tmp_path / "runs").glob("privacy-audit-*"))
    for name in ("privacy_scores.csv", "privacy_table.csv", "privacy_table.md", "utility.csv",
                 "summary.json", "privacy_utility.png", "settings.json"):
        assert (saved / name).exists(), name
    assert "| setting | attack |" in out
    summary = json.loads((saved / "summary.json").read_text())
    assert summary["targets"]["checked"] and summary["targets"]["default"] == "secagg+hidden"
    assert set(summary["strongest"]) == {"device", "cohort-3", "secagg", "secagg+hidden", "ldp-1"}
    assert summary["settings"]["cohort-3"]["group"] == 3
    table = pd.read_csv(saved / "privacy_table.csv")
    assert table.groupby("setting")["strongest"].sum().ge(1).all()  # ties all marked
    utility = pd.read_csv(saved / "utility.csv", index_col=0)
    assert utility.loc["device", "hr-ratio"] == 1.0
    assert utility.loc["ldp-1", "epsilon-mean"] > 0
    # SecAgg uploads the masked int64 vector; hidden asks every device every round
    assert utility.loc["secagg", "bytes-up-per-round"] > utility.loc["device",
                                                                     "bytes-up-per-round"]
    assert utility.loc["secagg+hidden", "bytes-down-per-round"] > utility.loc[
        "secagg", "bytes-down-per-round"]
    # a resumed folder recomputes nothing and reports the same
    cells = {p.name: p.stat().st_mtime_ns for p in (saved / "cells").iterdir()}
    assert main([*argv, "--resume", str(saved)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (saved / "cells").iterdir()} == cells
    assert json.loads((saved / "summary.json").read_text())["strongest"] == summary["strongest"]


def test_the_default_defence_is_an_audited_setting():
    from fedshare.runconfig import DEFAULT_DEFENCE

    assert DEFAULT_DEFENCE in SETTINGS and SETTINGS[DEFAULT_DEFENCE].defence == DEFAULT_DEFENCE
