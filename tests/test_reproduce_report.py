"""The reproduction's figures, claim checks and report on a synthetic results folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from simulations.reproduce import claims
from simulations.reproduce.figures import draw_all
from simulations.reproduce.report import write_report

SEEDS = (0, 1)
PNG = b"\x89PNG\r\n\x1a\n"
FIGURES = ("learning_curves.png", "fig4_time_storage.png", "fig5_sweeps.png", "cau_plane.png",
           "table3_bars.png")

LEARNING = {"fedshare": 0.30, "fedshare-fedavg": 0.24, "pdc-frs": 0.26, "cdcgnnfed": 0.27,
            "wo-cl": 0.25, "wo-bpr": 0.27, "no-sharing": 0.22}
UNLEARNING = {  # method: (HR@20, seconds, client bytes, server bytes)
    "no-unlearning": (0.29, 0.0, 0, 0),
    "fedshare": (0.28, 12.0, 0, 3 * 2**20),
    "wo-forgotten-graph": (0.27, 10.0, 0, 3 * 2**20),
    "wo-remaining-fl": (0.25, 4.0, 0, 3 * 2**20),
    "fru": (0.24, 9.0, 40 * 2**20, 2 * 2**20),
    "cufru": (0.25, 11.0, 0, 30 * 2**20),
    "retrain": (0.29, 300.0, 0, 0)}
CAU = {  # method: (Recall@10, Hit_u@1, U-score, seconds)
    "original": (0.100, 0.40, 0.50, 0.0), "retrain": (0.098, 0.30, 0.55, 200.0),
    "ga": (0.030, 0.05, 0.40, 5.0), "wo-ps": (0.090, 0.20, 0.58, 8.0),
    "wo-cu": (0.092, 0.22, 0.57, 8.0), "cau-gradient-hard": (0.096, 0.15, 0.62, 10.0),
    "cau-gradient-soft": (0.095, 0.13, 0.64, 10.0), "cau-embedding-hard": (0.097, 0.14, 0.63, 11.0),
    "cau-embedding-soft": (0.096, 0.12, 0.65, 11.0)}


def jitter(rng: np.random.Generator, value: float, scale: float = 0.002) -> float:
    return float(value + rng.normal(0.0, scale))


def write_csv(folder: Path, name: str, rows: list[dict]) -> None:
    pd.DataFrame(rows).to_csv(folder / f"{name}.csv", index=False)


def learning_rows(rng: np.random.Generator) -> list[dict]:
    return [{"seed": s, "method": m, "test_hr@20": jitter(rng, hr),
             "test_ndcg@20": jitter(rng, hr / 2), "valid_hr@20": jitter(rng, hr),
             "valid_ndcg@20": jitter(rng, hr / 2), "seconds": jitter(rng, 100.0, 5.0)}
            for s in SEEDS for m, hr in LEARNING.items()]


def synthetic_folder(folder: Path) -> Path:
    """Every CSV of the schema, small plausible numbers, two seeds."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({
        "target": "all", "dataset": "ml-100k", "seeds": list(SEEDS), "quick": False,
        "tuning_plans": ["100:100", "101:101"], "reported_plans": ["0:0", "1:1"],
        "protocol": {"split": "8:1:1 random per user", "filtering": "users with >= 5 items",
                     "ranking": "full ranking over items not in training",
                     "seeds": "plans 0:0 and 1:1", "tuning": "grid on plans 100, 101"},
        "elapsed_seconds": 1234.5, "cells": 140, "started": "2026-12-03T10:00:00",
        "finished": "2026-12-03T10:20:34"}))
    (folder / "chosen.json").write_text(json.dumps({
        "learning": {"fedshare": {"tau": 0.5, "lambda1": 0.3},
                     "cdcgnnfed": {"mending": 0.1}, "pdc-frs": {"epsilon": 2.0}},
        "unlearning": {"fedshare": {"unlearn-tau": 0.2, "snapshots": 5},
                       "fru": {"lr": 0.01}, "cufru": {"lr": 0.02}},
        "budget": 8, "criterion": "mean valid NDCG@20 over the tuning plans"}))
    write_csv(folder, "tuning", [
        {"stage": "learning", "method": "fedshare", "settings": json.dumps({"tau": t}),
         "plan": p, "valid_hr@20": 0.3, "valid_ndcg@20": 0.15, "score": 0.15 + t / 100}
        for t in (0.1, 0.5) for p in ("100:100", "101:101")])
    write_csv(folder, "learning", learning_rows(rng))
    write_csv(folder, "curves", [
        {"seed": s, "method": m, "round": r, "valid_hr@20": jitter(rng, hr * (1 - 0.6 ** (r / 10))),
         "valid_ndcg@20": jitter(rng, hr / 2 * (1 - 0.6 ** (r / 10)))}
        for s in SEEDS for m, hr in LEARNING.items() for r in range(10, 101, 10)])
    write_csv(folder, "unlearning", [
        {"seed": s, "method": m, "test_hr@20": jitter(rng, hr), "test_ndcg@20": jitter(rng, hr / 2),
         "forgotten_hr@20": jitter(rng, 0.1), "mia_auc": jitter(rng, 0.5),
         "top20_jaccard": jitter(rng, 0.8), "seconds": abs(jitter(rng, sec, sec / 20)),
         "kept_bytes": cb + sb, "client_bytes": cb, "server_bytes": sb,
         "bytes_down": 10 * 2**20, "bytes_up": 5 * 2**20}
        for s in SEEDS for m, (hr, sec, cb, sb) in UNLEARNING.items()])
    groups = {"0.0:0.0:1.0": 0.0, "0.1:0.2:0.7": 0.16, "0.3:0.3:0.4": 0.39}
    sweep_base = {"fedshare": 0.30, "fedshare-fedavg": 0.24, "cdcgnnfed": 0.27, "pdc-frs": 0.26}
    write_csv(folder, "sweep_users", [
        {"seed": s, "groups": g, "shared_fraction": f + 0.01 * s, "method": m,
         "test_hr@20": jitter(rng, hr + f / 5), "test_ndcg@20": jitter(rng, hr / 2 + f / 10)}
        for s in SEEDS for g, f in groups.items() for m, hr in sweep_base.items()])
    write_csv(folder, "sweep_lambda", [
        {"seed": s, "lambda1": lam, "test_hr@20": jitter(rng, 0.30 - (lam - 0.4) ** 2),
         "test_ndcg@20": jitter(rng, 0.15), "valid_ndcg@20": jitter(rng, 0.15)}
        for s in SEEDS for lam in (0.1, 0.3, 0.5, 0.7)])
    write_csv(folder, "sweep_snapshots", [
        {"seed": s, "snapshots": m, "test_hr@20": jitter(rng, 0.30 - 0.05 / m),
         "test_ndcg@20": jitter(rng, 0.15), "kept_bytes": m * 2**20 * 0.6,
         "seconds": jitter(rng, 10.0 + m, 0.5), "forgotten_hr@20": jitter(rng, 0.1)}
        for s in SEEDS for m in (1, 2, 3, 5, 10)])
    write_csv(folder, "sweep_gamma", [
        {"seed": s, "gamma": g, "method": m, "test_hr@20": jitter(rng, hr - g / 5),
         "test_ndcg@20": jitter(rng, hr / 2), "seconds": jitter(rng, 10.0, 1.0)}
        for s in SEEDS for g in (0.1, 0.3, 0.5)
        for m, hr in {"fedshare": 0.28, "fru": 0.24, "cufru": 0.25, "retrain": 0.29}.items()])
    write_csv(folder, "cau", [
        {"backbone": b, "seed": s, "method": m, "recall@10": jitter(rng, r, 0.001),
         "ndcg@10": jitter(rng, r / 2, 0.001), "recall@20": jitter(rng, r * 1.5, 0.001),
         "ndcg@20": jitter(rng, r / 1.7, 0.001), "hit_u@1": jitter(rng, h, 0.005),
         "hit_u@5": jitter(rng, h * 2, 0.005), "hit_u_full@1": jitter(rng, h, 0.005),
         "u_score": jitter(rng, u, 0.003), "seconds": abs(jitter(rng, sec, 0.5)),
         "client_messages": 100, "bytes_down": 2**20, "bytes_up": 2**19}
        for b in ("sasrec", "gru4rec") for s in SEEDS for m, (r, h, u, sec) in CAU.items()])
    return folder


def fake_numbers() -> pd.DataFrame:
    """A few of the papers' values in the long format of ``load_paper_numbers``."""
    rows = []

    def add(paper, table, phase, method, dataset, backbone, metric, value):
        rows.append({"paper": paper, "table": table, "row": method, "phase": phase,
                     "method": method, "dataset": dataset, "backbone": backbone,
                     "metric": metric, "value": value, "note": ""})

    for phase, methods in (("learning", ("fedshare-fedavg", "pdc-frs", "cdcgnnfed", "fedshare")),
                           ("unlearning", ("retrain", "fru", "cufru", "fedshare"))):
        for i, m in enumerate(methods):
            for dataset in ("ml-1m", "fashion"):
                add("fedshare", "III", phase, m, dataset, "", "hr@20", 0.1111 + i / 100)
                add("fedshare", "III", phase, m, dataset, "", "ndcg@20", 0.0555 + i / 100)
    for phase, methods in (("learning", ("fedshare", "wo-cl", "wo-bpr")),
                           ("unlearning", ("fedshare", "wo-forgotten-graph", "wo-remaining-fl"))):
        for m in methods:
            add("fedshare", "IV", phase, m, "ml-1m", "", "hr@20", 0.2222)
            add("fedshare", "IV", phase, m, "ml-1m", "", "ndcg@20", 0.1111)
    for backbone in ("gru4rec", "sasrec", "bert4rec"):
        for m in ("original", "retrain", "sisa", "sru", "cau-gradient-hard", "cau-gradient-soft",
                  "cau-embedding-hard", "cau-embedding-soft"):
            for metric in ("recall@10", "recall@20", "ndcg@10", "ndcg@20"):
                add("cau", "1", "", m, "ml-1m", backbone, metric, 0.3333)
            for metric in ("hit_u@1", "hit_u@5", "u_score"):
                add("cau", "2", "", m, "ml-1m", backbone, metric, 0.4444)
    for m, minutes in (("retrain", 130.0), ("sisa", 40.0), ("sru", 45.0), ("cau", 10.0)):
        add("cau", "3", "", m, "video-games", "", "minutes", minutes)
    for m in ("cau", "wo-ps", "wo-cu", "ga"):
        for metric in ("ndcg@10", "recall@10", "hit_u@1", "u_score"):
            add("cau", "4", "", m, "ml-1m", "sasrec", metric, 0.5555)
    return pd.DataFrame(rows)


def fake_claims() -> list[dict]:
    return [{"id": cid, "paper": "cau" if cid.startswith("cau") else "fedshare",
             "where": "Sec. V", "text": f"the paper says {cid}"}
            for cid in claims.DEFAULT_CHECKS]


@pytest.fixture
def folder(tmp_path) -> Path:
    return synthetic_folder(tmp_path / "results")


def test_draw_all_writes_every_figure(folder):
    paths = draw_all(folder)
    assert sorted(p.name for p in paths) == sorted(FIGURES)
    for path in paths:
        assert path.parent == folder / "figures"
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 10_000


def test_report_has_tables_paper_values_figures_and_verdicts(folder):
    draw_all(folder)
    text = write_report(folder, numbers=fake_numbers(), claims=fake_claims()).read_text()
    for row in ("| FedShare-FedAvg |", "| PDC-FRS |", "| CDCGNNFed |", "| Retrain |",
                "| FRU |", "| CUFRU |", "no sharing", "w/o CL", "w/o forgotten graph"):
        assert row in text, row
    assert "paper, ML-1M (nearest; no ml-100k in the paper)" in text
    assert "0.1411" in text  # the paper's FedShare HR@20 (learning, ML-1M)
    for name in FIGURES:
        assert f"](figures/{name})" in text, name
    assert "| tau | 0.5 |" in text and "| lambda1 | 0.3 |" in text
    assert "Temperature and lambda1 chosen on validation (Sec. V-D)" in text
    assert "not built" in text  # SISA, SRU, BERT4Rec
    claim_rows = [line for line in text.splitlines() if line.startswith("| ") and
                  any(f"| {cid} |" in line for cid in claims.DEFAULT_CHECKS)]
    assert len(claim_rows) == len(claims.DEFAULT_CHECKS)
    verdicts = (claims.HOLDS, claims.NOT_HOLD, claims.PARTLY, claims.NOISE, claims.NOT_RUN)
    for line in claim_rows:
        assert any(f"| {v} |" in line for v in verdicts), line
    assert f"| {claims.NOT_RUN} |" not in "\n".join(claim_rows)


def test_synthetic_claims_hold_where_the_data_says_so(folder):
    from simulations.reproduce.readout import load_results

    results = load_results(folder)
    for cid in ("fedshare-learning-best", "fedshare-storage", "ablation-wo-cl",
                "sweep-user-ratio", "sweep-lambda1", "cau-keeps-recall", "cau-time",
                "cau-wo-rl-collapses"):
        assert claims.DEFAULT_CHECKS[cid](results)[0] == claims.HOLDS, cid


def known(fedshare: list[float], rival: list[float],
          rivals: tuple[str, ...] = ("fedshare-fedavg", "pdc-frs", "cdcgnnfed")
          ) -> tuple[str, str]:
    """fedshare-learning-best on FedShare's per-seed scores against the rivals' (all equal)."""
    rows = [{"seed": s, "method": m, "test_hr@20": v, "test_ndcg@20": v}
            for m, vals in (("fedshare", fedshare), *((r, rival) for r in rivals))
            for s, v in enumerate(vals)]
    return claims.DEFAULT_CHECKS["fedshare-learning-best"]({"learning": pd.DataFrame(rows)})


def test_claim_check_known_answers():
    verdict, evidence = known([0.30, 0.31], [0.20, 0.21])
    assert verdict == claims.HOLDS and "0.3050" in evidence and "0.2050" in evidence
    verdict, evidence = known([0.30, 0.34], [0.31, 0.32])  # gap 0.005 < std 0.028
    assert verdict == claims.NOISE and "within noise" in evidence
    verdict, evidence = known([0.20, 0.21], [0.30, 0.31])
    assert verdict == claims.NOT_HOLD and "reversed" in evidence
    verdict, evidence = known([0.30, 0.31], [0.20, 0.21], rivals=("cdcgnnfed",))
    assert verdict == claims.PARTLY and "not run: FedShare-FedAvg, PDC-FRS" in evidence
    assert claims.DEFAULT_CHECKS["cau-time"]({})[0] == claims.NOT_RUN


def test_combining_orderings():
    assert claims.combine([claims.HOLDS, claims.HOLDS]) == claims.HOLDS
    assert claims.combine([claims.HOLDS, claims.NOISE]) == claims.PARTLY
    assert claims.combine([claims.NOISE, claims.NOT_HOLD]) == claims.NOT_HOLD
    assert claims.combine([claims.NOISE, claims.NOISE]) == claims.NOISE
    assert claims.majority([claims.HOLDS, claims.HOLDS, claims.NOT_HOLD]) == claims.HOLDS


def test_only_learning_csv(tmp_path):
    folder = tmp_path / "partial"
    folder.mkdir()
    write_csv(folder, "learning", learning_rows(np.random.default_rng(1)))
    paths = draw_all(folder)
    assert [p.name for p in paths] == ["table3_bars.png"]
    text = write_report(folder, numbers=fake_numbers(), claims=fake_claims()).read_text()
    assert "| FedShare-FedAvg |" in text
    assert "fig4_time_storage.png" not in text and "cau_plane.png" not in text
    assert text.count("not run") >= 5
    verdict_of = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()
                  if line.startswith("| cau-time ") or line.startswith("| fedshare-learning-best ")}
    assert f"| {claims.NOT_RUN} |" in verdict_of["cau-time"]
    assert f"| {claims.HOLDS} |" in verdict_of["fedshare-learning-best"]


def test_missing_paper_numbers_module_is_loaded_lazily(folder, monkeypatch):
    """Injected numbers and claims never import the paper module (it may not exist yet)."""
    import sys

    monkeypatch.setitem(sys.modules, "simulations.reproduce.paper", None)
    assert write_report(folder, numbers=fake_numbers(), claims=[]).is_file()
