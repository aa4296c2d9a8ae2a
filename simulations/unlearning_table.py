"""The unlearning table (paper Table III right half and Table IV): learn once per seed, let
gamma = 0.3 of the sharing users unshare, then run no-unlearning, FedShare, its two ablations,
FRU, CUFRU and Retrain from the same learned state (learned once, with the FRU / CUFRU histories
recorded; FRU at its paper's settings, :class:`FruSettings`). Columns: test HR/NDCG@20 over
all users; on the unsharing users: forgotten-interaction HR/Recall@20, membership-inference
AUC, top-20 Jaccard and Spearman agreement with Retrain, canary exposure and AUC (with
``canaries > 0``); wall time and bytes kept (in total and on the clients, read from the run's
storage ledger).

With ``settings`` (a ``chosen.json`` of ``fedshare tune-unlearning``, :mod:`simulations.tuning`)
every method runs at its chosen settings; with ``plans`` the table reports over fresh plans of
the config's dataset (split seed : plan seed pairs, prepared in memory, each with every seed),
mean ± std over all (plan, seed) cells, and refuses a plan that shares a seed with a tuning plan.

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

from fedshare.data.prepared import PreparedData
from fedshare.errors import FedShareError
from fedshare.runconfig import data_key, load_data
from fedshare.unlearning.config import UnlearningConfig
from fedshare.unlearning.fru_selection import FruSettings
from fedshare.unlearning.phase import METHODS, learn, unlearn
from fedshare.unlearning.remaining import add_canaries
from fedshare.unlearning.report import unlearning_row
from simulations.experiment import leased_folder, resolve
from simulations.plans import fresh_plan, label, plan_of, plan_record, seed_clash
from simulations.tuning import ChosenSettings

CONFIGS = Path(__file__).parent / "configs"
# forgetting columns: over the unsharing users who still hold data; ``_no_data``: over those
# who unshared everything (fedshare.unlearning.report)
COLUMNS = ("test_hr@20", "test_ndcg@20", "forgotten_hr@20", "forgotten_recall@20", "mia_auc",
           "top20_jaccard", "spearman", "canary_exposure", "canary_auc", "users_with_data",
           "forgotten_hr@20_no_data", "top20_jaccard_no_data", "canary_exposure_no_data",
           "users_no_data", "seconds", "kept_bytes", "client_bytes", "server_bytes",
           "client_messages", "bytes_down", "bytes_up", "devices_online")


def unlearning_cells(seed: int, sets: Sequence[str], unlearning: UnlearningConfig,
                     canaries: int, common_canaries: bool, data: PreparedData | None = None,
                     settings: ChosenSettings | None = None) -> list[dict]:
    """Every method for one seed, from one learned federation (on ``data``, default: the
    config's; at ``settings``' chosen settings, default: ``unlearning`` and FRU/CUFRU's)."""
    torch.set_num_threads(1)
    experiment = resolve(CONFIGS / "fedshare.toml", [f"seed={seed}", *sets])
    if data is None:
        data = load_data(data_key(experiment.run, {}))
    canary_set = None
    if canaries > 0:
        data, canary_set = add_canaries(data, canaries, seed, common=common_canaries)
    config = experiment.config
    learned = learn(data, config, record=True, fru=FruSettings())  # FRU at its paper's settings
    configs = {m: settings.configs(m) if settings else (unlearning, None) for m in METHODS}
    outcomes = {m: unlearn(learned, data, m, configs[m][0], config.rounds, configs[m][1])
                for m in METHODS}
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
            whole = c.endswith("_bytes") or c.startswith(("users_", "bytes_")) \
                or c in ("client_messages", "devices_online")
            cells.append(f"{m:.0f}" if whole else f"{m:.4f} ± {s:.4f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def reported_data(sets: Sequence[str], plans: Sequence[tuple[int, int]] | None = None,
                  groups: Sequence[float] | None = None, gamma: float | None = None,
                  settings: ChosenSettings | None = None) -> list[PreparedData]:
    """The data a table reports on: the config's, or fresh ``plans`` of its dataset; refused
    when a plan shares a seed with a tuning plan of ``settings``."""
    run = resolve(CONFIGS / "fedshare.toml", list(sets)).run
    if plans is None:
        if groups is not None or gamma is not None:
            raise FedShareError("--groups and --gamma shape the fresh plans of --plans")
        datas = [load_data(data_key(run, {}))]
    else:
        seeded = [s for s in sets if s.partition("=")[0].strip() in ("split-seed", "plan-seed")]
        if seeded:
            raise FedShareError(f"--plans names the split and plan seeds; drop --set {seeded[0]}")
        if not plans:
            raise FedShareError("--plans names no plan")
        datas = [fresh_plan(run, split, plan, groups, gamma) for split, plan in plans]
    if settings is not None:
        for data in datas:
            clash = seed_clash(plan_of(data), settings.all_plans())
            if clash:
                raise FedShareError(f"{clash} of {settings.path}: tuning and reported plans "
                                    "must be disjoint")
    return datas


def unlearning_table(seeds: Sequence[int] = (0, 1, 2), sets: Sequence[str] = (),
                     unlearning: UnlearningConfig | None = None, canaries: int = 5,
                     common_canaries: bool = True, out: str | Path = "runs",
                     progress: Callable[[str], None] = print,
                     plans: Sequence[tuple[int, int]] | None = None,
                     groups: Sequence[float] | None = None, gamma: float | None = None,
                     settings: ChosenSettings | None = None
                     ) -> tuple[Path, pd.DataFrame, dict]:
    unlearning = unlearning or UnlearningConfig()
    # the data first (bad data fail before any folder is made), and the plans they report on
    datas = reported_data(sets, plans, groups, gamma, settings)
    with leased_folder(out, "unlearning-table") as folder:
        rows: list[dict] = []
        for data, seed in [(d, s) for d in datas for s in seeds]:
            cells = unlearning_cells(seed, sets, unlearning, canaries, common_canaries,
                                     data if plans is not None else None, settings)
            if plans is not None:
                where = plan_of(data)
                cells = [{"plan": label(where), "split_seed": where["split_seed"],
                          "plan_seed": where["plan_seed"], **row} for row in cells]
            rows += cells
            for row in cells:
                at = f"plan {row['plan']} " if plans is not None else ""
                progress(f"{at}seed {seed} {row['method']:>19}: test HR@20 "
                         f"{row['test_hr@20']:.4f} "
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
            {"targets": figures, "methods": methods,
             "unlearning": (settings.unlearning if settings else unlearning).to_dict(),
             "fru": FruSettings().to_dict(),
             "canaries": canaries, "common_canaries": common_canaries, "seeds": list(seeds),
             **({"settings": settings.record()} if settings else {}),
             **plan_record(datas, settings.plans() if settings else None)},
            indent=2))
        return folder, stats, figures


def main() -> None:  # python -m simulations.unlearning_table
    folder, stats, figures = unlearning_table()
    print(to_markdown(stats))
    print(json.dumps(figures, indent=2))
    print(f"saved in {folder}")


if __name__ == "__main__":
    main()
