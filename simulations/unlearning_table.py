"""The unlearning table (paper Table III right half and Table IV): learn once per seed, let
gamma = 0.3 of the sharing users unshare, then run no-unlearning, FedShare, its two ablations,
FRU, CUFRU and Retrain from the same learned state (learned once, with the FRU / CUFRU histories
recorded; FRU at its paper's settings, :class:`FruSettings`). Columns: test HR/NDCG@20 over
all users; on the unsharing users: forgotten-interaction HR/Recall@20, membership-inference
AUC, top-20 Jaccard and Spearman agreement with Retrain, canary exposure and AUC (with
``canaries > 0``); wall time and bytes kept (in total and on the clients, read from the run's
storage ledger).

Runs in process (the same server and client code as the Flower app). Saved as
``unlearning_table.csv`` (method x seed), ``unlearning_table.md`` and ``summary.json`` (per
method: mean wall time, bytes kept and every metric; and the acceptance ratios of the unlearning
issue, computed from the means).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import torch

from fedshare.runconfig import data_key, load_data
from fedshare.unlearning.config import UnlearningConfig
from fedshare.unlearning.fru_selection import FruSettings
from fedshare.unlearning.phase import METHODS, learn, unlearn
from fedshare.unlearning.remaining import add_canaries
from fedshare.unlearning.report import unlearning_row
from simulations.experiment import leased_folder, resolve
from simulations.plans import plan_record

CONFIGS = Path(__file__).parent / "configs"
# forgetting columns: over the unsharing users who still hold data; ``_no_data``: over those
# who unshared everything (fedshare.unlearning.report)
COLUMNS = ("test_hr@20", "test_ndcg@20", "forgotten_hr@20", "forgotten_recall@20", "mia_auc",
           "top20_jaccard", "spearman", "canary_exposure", "canary_auc", "users_with_data",
           "forgotten_hr@20_no_data", "top20_jaccard_no_data", "canary_exposure_no_data",
           "users_no_data", "seconds", "kept_bytes", "client_bytes", "server_bytes")


def unlearning_cells(seed: int, sets: Sequence[str], unlearning: UnlearningConfig,
                     canaries: int, common_canaries: bool) -> list[dict]:
    """Every method for one seed, from one learned federation."""
    torch.set_num_threads(1)
    experiment = resolve(CONFIGS / "fedshare.toml", [f"seed={seed}", *sets])
    data = load_data(data_key(experiment.run, {}))
    canary_set = None
    if canaries > 0:
        data, canary_set = add_canaries(data, canaries, seed, common=common_canaries)
    config = experiment.config
    learned = learn(data, config, record=True, fru=FruSettings())  # FRU at its paper's settings
    outcomes = {m: unlearn(learned, data, m, unlearning, config.rounds) for m in METHODS}
    rows = []
    for method in METHODS:
        row = unlearning_row(outcomes[method], data, canary_set, outcomes["retrain"])
        rows.append({"seed": seed, **row})
    return rows


def targets(stats: pd.DataFrame) -> dict:
    """The acceptance figures of the unlearning issue, from the per-method means."""
    mean = stats.xs("mean", axis=1, level=1)
    fed, retrain, none = mean.loc["fedshare"], mean.loc["retrain"], mean.loc["no-unlearning"]
    out = {"time_ratio_fedshare_vs_retrain": fed["seconds"] / retrain["seconds"],
           "hr_ratio_fedshare_vs_retrain": fed["test_hr@20"] / retrain["test_hr@20"],
           "jaccard_fedshare": fed.get("top20_jaccard"),
           "jaccard_no_unlearning": none.get("top20_jaccard")}
    if "canary_exposure" in mean:
        excess = none["canary_exposure"] - retrain["canary_exposure"]
        out.update({"canary_exposure_original": none["canary_exposure"],
                    "canary_exposure_retrain": retrain["canary_exposure"],
                    "canary_exposure_fedshare": fed["canary_exposure"],
                    "canary_excess_original": excess,
                    "canary_excess_removed": (none["canary_exposure"] - fed["canary_exposure"])
                    / excess if excess else float("nan")})
    return {k: (float(v) if v is not None else None) for k, v in out.items()}


def to_markdown(stats: pd.DataFrame) -> str:
    columns = [c for c in COLUMNS if c in stats.columns.get_level_values(0)]
    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method in stats.index:
        cells = []
        for c in columns:
            m, s = stats.loc[method, (c, "mean")], stats.loc[method, (c, "std")]
            whole = c.endswith("_bytes") or c.startswith("users_")
            cells.append(f"{m:.0f}" if whole else f"{m:.4f} ± {s:.4f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def unlearning_table(seeds: Sequence[int] = (0, 1, 2), sets: Sequence[str] = (),
                     unlearning: UnlearningConfig | None = None, canaries: int = 5,
                     common_canaries: bool = True, out: str | Path = "runs",
                     progress: Callable[[str], None] = print) -> tuple[Path, pd.DataFrame, dict]:
    unlearning = unlearning or UnlearningConfig()
    # the data first (bad data fail before any folder is made), and the plan they report on
    data = load_data(data_key(resolve(CONFIGS / "fedshare.toml", list(sets)).run, {}))
    with leased_folder(out, "unlearning-table") as folder:
        rows: list[dict] = []
        for seed in seeds:
            cells = unlearning_cells(seed, sets, unlearning, canaries, common_canaries)
            rows += cells
            for row in cells:
                progress(f"seed {seed} {row['method']:>19}: test HR@20 {row['test_hr@20']:.4f} "
                         f"forgotten HR@20 {row['forgotten_hr@20']:.4f} "
                         f"canary {row.get('canary_exposure', float('nan')):.4f} "
                         f"({row['seconds']:.1f} s)")
        frame = pd.DataFrame(rows)
        frame.to_csv(folder / "unlearning_table.csv", index=False)
        numeric = [c for c in COLUMNS if c in frame.columns]
        stats = frame.groupby("method", sort=False)[numeric].agg(["mean", "std"]).fillna(0.0)
        stats = stats.reindex([m for m in METHODS if m in stats.index])
        (folder / "unlearning_table.md").write_text(to_markdown(stats))
        figures = targets(stats)
        means = stats.xs("mean", axis=1, level=1)
        methods = {m: {k: float(v) for k, v in means.loc[m].items()} for m in means.index}
        (folder / "summary.json").write_text(json.dumps(
            {"targets": figures, "methods": methods, "unlearning": unlearning.to_dict(),
             "fru": FruSettings().to_dict(),
             "canaries": canaries, "common_canaries": common_canaries, "seeds": list(seeds),
             **plan_record([data])},
            indent=2))
        return folder, stats, figures


def main() -> None:  # python -m simulations.unlearning_table
    folder, stats, figures = unlearning_table()
    print(to_markdown(stats))
    print(json.dumps(figures, indent=2))
    print(f"saved in {folder}")


if __name__ == "__main__":
    main()
