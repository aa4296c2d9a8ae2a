"""The cells' results as the tidy CSV files of a results folder (the report and the figures
read only these): one row per (seed, method) or (seed, sweep value, method)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from fedshare.atomic import write_atomically
from simulations.reproduce.plan import DEFAULT_GROUPS, USER_SWEEP_METHODS, Design, chosen_learning

LEARNING_COLUMNS = ("seed", "method", "test_hr@20", "test_ndcg@20", "valid_hr@20",
                    "valid_ndcg@20", "seconds")
UNLEARNING_COLUMNS = ("seed", "method", "test_hr@20", "test_ndcg@20", "forgotten_hr@20",
                      "mia_auc", "top20_jaccard", "seconds", "kept_bytes", "client_bytes",
                      "server_bytes", "bytes_down", "bytes_up")


def _groups_label(groups: object) -> str:
    return ":".join(f"{g:g}" for g in (groups or DEFAULT_GROUPS))  # type: ignore[union-attr]


def frames(results: Mapping[str, dict]) -> dict[str, pd.DataFrame]:
    """Every table the results hold, keyed by CSV stem."""
    learn = {k: v for k, v in results.items() if k.startswith("learn-")}
    out: dict[str, pd.DataFrame] = {}
    if learn:
        out["learning"] = pd.DataFrame([{c: r[c] for c in LEARNING_COLUMNS} for r in
                                        learn.values()])
        out["curves"] = pd.DataFrame([{"seed": r["seed"], "method": r["method"], **point}
                                      for r in learn.values() for point in r["curve"]])
    users = [r for k, r in results.items() if k.startswith("users-")]
    users += [r for r in learn.values() if r["method"] in USER_SWEEP_METHODS] if users else []
    if users:
        out["sweep_users"] = pd.DataFrame([
            {"seed": r["seed"], "groups": _groups_label(r.get("groups")),
             "shared_fraction": r["shared_fraction"], "method": r["method"],
             "test_hr@20": r["test_hr@20"], "test_ndcg@20": r["test_ndcg@20"]}
            for r in users])
    lam = [r for k, r in results.items() if k.startswith("lambda1=")]
    if lam:
        out["sweep_lambda"] = pd.DataFrame([
            {"seed": r["seed"], "lambda1": r["settings"]["lambda1"],
             "test_hr@20": r["test_hr@20"], "test_ndcg@20": r["test_ndcg@20"],
             "valid_ndcg@20": r["valid_ndcg@20"]} for r in lam])
    unl = [r for k, r in results.items() if k.startswith("unlearn-")]
    if unl:
        out["unlearning"] = pd.DataFrame([{c: row.get(c) for c in UNLEARNING_COLUMNS}
                                          for r in unl for row in r["methods"]])
        out["sweep_snapshots"] = pd.DataFrame([
            {"seed": row["seed"], "snapshots": row["snapshots"], "test_hr@20": row["test_hr@20"],
             "test_ndcg@20": row["test_ndcg@20"], "kept_bytes": row["kept_bytes"],
             "seconds": row["seconds"], "forgotten_hr@20": row.get("forgotten_hr@20")}
            for r in unl for row in r["snapshots"]])
    gam = [r for k, r in results.items() if k.startswith("gamma-")]
    if gam:
        rows = [{"seed": row["seed"], "gamma": row["gamma"], "method": row["method"],
                 "test_hr@20": row["test_hr@20"], "test_ndcg@20": row["test_ndcg@20"],
                 "seconds": row["seconds"]} for r in gam for row in r["rows"]]
        # gamma 0.3 is the main unlearning cell's: the same learned state and requests
        rows += [{"seed": row["seed"], "gamma": 0.3, "method": row["method"],
                  "test_hr@20": row["test_hr@20"], "test_ndcg@20": row["test_ndcg@20"],
                  "seconds": row["seconds"]} for r in unl for row in r["methods"]
                 if row["method"] in {x["method"] for x in rows}]
        out["sweep_gamma"] = pd.DataFrame(rows).sort_values(["gamma", "method", "seed"])
    cau = [r for k, r in results.items() if k.startswith("cau-") and k.endswith("-row")]
    if cau:
        out["cau"] = pd.DataFrame(cau)
    tune = results.get("tune-unlearn")
    tuning = [{"stage": "learning", "method": r["method"],
               "settings": json.dumps(r["settings"], sort_keys=True),
               "plan": f"{r['split_seed']}:{r['plan_seed']}", "valid_hr@20": r["valid_hr@20"],
               "valid_ndcg@20": r["valid_ndcg@20"], "score": r["valid_ndcg@20"]}
              for k, r in results.items() if k.startswith("tune-") and k != "tune-unlearn"]
    if tune:
        tuning += _unlearning_scores(tune["rows"])
    if tuning:
        out["tuning"] = pd.DataFrame(tuning)
    return out


def _unlearning_scores(rows: list[dict]) -> list[dict]:
    """The unlearning candidates with ``fedshare tune-unlearning``'s score (the references,
    Retrain and no-unlearning, have none)."""
    from simulations.tuning import score_frame

    frame = pd.DataFrame(rows)
    scored = score_frame(frame)["score"]
    return [{"stage": "unlearning", "method": row["method"],
             "settings": row.get("settings", "{}"), "plan": row["plan"],
             "valid_hr@20": row["valid_hr@20"], "valid_ndcg@20": row["valid_ndcg@20"],
             "score": float(scored[i]) if i in scored.index else None}
            for i, row in enumerate(rows)]


def chosen_record(design: Design, results: Mapping[str, dict]) -> dict:
    """``chosen.json``: every tuned method's settings and how they were chosen."""
    tune = results.get("tune-unlearn", {})
    return {"learning": chosen_learning(design, results) if any(
                k.startswith("tune-") and k != "tune-unlearn" for k in results) else {},
            "unlearning": tune.get("chosen", {}),
            "budget": {"learning": _learning_budget(results),
                       "unlearning": tune.get("budget", {})},
            "criterion": "learning: mean valid NDCG@20 over the tuning plans; unlearning: "
                         "fedshare tune-unlearning's score (valid NDCG@20 against Retrain's "
                         "plus the canary excess removed); ties to the earlier candidate"}


def _learning_budget(results: Mapping[str, dict]) -> dict[str, int]:
    """Distinct settings each learning method was tried at."""
    tried: dict[str, set[str]] = {}
    for key, r in results.items():
        if key.startswith("tune-") and key != "tune-unlearn":
            tried.setdefault(r["method"], set()).add(json.dumps(r["settings"], sort_keys=True))
    return {m: len(s) for m, s in tried.items()}


def write_frames(folder: Path, tables: Mapping[str, pd.DataFrame]) -> None:
    for name, frame in tables.items():
        write_atomically(folder / f"{name}.csv", lambda fh, f=frame: f.to_csv(fh, index=False),
                         "w")
