"""Choosing the learning methods' settings on plans the learning table never reports (issue 18).

``fedshare tune-learning`` gives FedShare and the learning baselines the same search, as
``fedshare tune-unlearning`` does for the unlearning methods:

- **Tuning plans**, disjoint from the reported one (the learning table reports split seed 0 and
  plan seed 0): by default 100:100 and 101:101 of the config's dataset, prepared in memory
  (:func:`simulations.plans.fresh_plan`).
- **The same budget**: every method runs at the first ``budget`` entries (default 6) of its grid
  in ``simulations/learning_grids.toml`` (the product of its axes, the first axis slowest; every
  axis starts at the method's current default, so ``--budget 1`` is the defaults). A grid
  shorter than the budget is refused.
- **The criterion, on validation only**: the mean over the tuning plans of validation NDCG@20;
  ties go to the earlier grid entry. Test metrics are recorded in ``tuning.csv`` and never read.

Every run is the in-process engine from the method's config (``simulations/configs/<method>.toml``)
with the candidate's run-config keys over it. The command writes a leased folder with
``tuning.csv`` and ``chosen.json`` (per method: the chosen keys, the grid, the mean scores, the
budget and the tuning plans with their identity); ``fedshare learning-table --settings
chosen.json`` reports every tuned method at its chosen settings, and without ``--settings`` it
applies :data:`CHOSEN`, the committed result of the default tuning.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from fedshare.errors import FedShareError
from fedshare.federated.inprocess import run_inprocess
from simulations.experiment import leased_folder, resolve
from simulations.plans import fresh_plan, label, plan_of
from simulations.tuning import first_entries

CONFIGS = Path(__file__).parent / "configs"
GRIDS = Path(__file__).parent / "learning_grids.toml"
CHOSEN = Path(__file__).parent / "learning_chosen.json"
"""The committed ``chosen.json`` of the default tuning: ``fedshare learning-table`` applies it
unless told otherwise, so the table is one command."""
TUNING_PLANS = ((100, 100), (101, 101))
REPORTED_PLAN = (0, 0)
BUDGET = 6
CRITERION = "mean over the tuning plans of valid NDCG@20; ties to the earlier grid entry"


def load_grids(path: str | Path = GRIDS) -> dict[str, dict[str, list]]:
    """Every tuned method's axes (one TOML table per config name of ``simulations/configs``)."""
    try:
        table = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise FedShareError(f"cannot read the grids {path}: {exc}") from None
    for method, axes in table.items():
        if not (CONFIGS / f"{method}.toml").exists():
            raise FedShareError(f"{path}: [{method}] names no config in {CONFIGS}")
        if not isinstance(axes, dict) or not axes or not all(
                isinstance(v, list) and v for v in axes.values()):
            raise FedShareError(f"{path}: [{method}] needs non-empty lists of values")
    if not table:
        raise FedShareError(f"{path}: no method to tune")
    return table


def candidates(grids: Mapping[str, Mapping[str, Sequence]], budget: int = BUDGET,
               sets: Sequence[str] = ()) -> dict[str, list[dict[str, Any]]]:
    """The first ``budget`` entries of every method's grid, each checked against the method's
    config (an unknown key or a bad value is refused before anything runs)."""
    if budget < 1:
        raise FedShareError(f"the budget must be >= 1, got {budget}")
    out = {}
    for method, axes in grids.items():
        out[method] = first_entries(method, axes, budget)
        for entry in out[method]:
            _experiment(method, entry, sets)
    return out


def _experiment(method: str, entry: Mapping[str, Any], sets: Sequence[str] = ()):
    return resolve(CONFIGS / f"{method}.toml",
                   [*sets, *(f"{k}={_toml(v)}" for k, v in entry.items())], name=method)


def _toml(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else str(value).lower() \
        if isinstance(value, bool) else str(value)


def select(scored: pd.DataFrame) -> dict[str, dict]:
    """Per method: the candidate with the best mean score (ties to the earlier entry)."""
    means = scored.groupby(["method", "candidate"], sort=False)["valid_ndcg@20"].mean()
    chosen = {}
    for method, scores in means.groupby(level=0, sort=False):
        best = int(scores.droplevel(0).idxmax())
        chosen[method] = {"candidate": best,
                          "scores": [float(v) for v in scores.to_numpy()]}
    return chosen


def tune_learning(plans: Sequence[tuple[int, int]] = TUNING_PLANS, budget: int = BUDGET,
                  grids_path: str | Path = GRIDS, sets: Sequence[str] = (),
                  out: str | Path = "runs", progress: Callable[[str], None] = print
                  ) -> tuple[Path, dict]:
    """Run every candidate of every method on every tuning plan; write ``tuning.csv`` and
    ``chosen.json``; return the folder and the chosen settings."""
    if REPORTED_PLAN in [tuple(p) for p in plans]:
        raise FedShareError("the tuning plans must not include the reported plan 0:0")
    grids = load_grids(grids_path)
    grid = candidates(grids, budget, sets)
    base = resolve(CONFIGS / "fedshare.toml", list(sets))
    data = [fresh_plan(base.run, s, p) for s, p in plans]  # bad data fail before any folder
    torch.set_num_threads(2)
    rows = []
    total = sum(len(v) for v in grid.values()) * len(data)
    with leased_folder(out, "tune-learning") as folder:
        for method, entries in grid.items():
            for k, entry in enumerate(entries):
                config = _experiment(method, entry, sets).config
                for prepared in data:
                    result = run_inprocess(prepared, config)
                    rows.append({"method": method, "candidate": k,
                                 "settings": json.dumps(entry, sort_keys=True),
                                 "plan": label(plan_of(prepared)),
                                 **{f"valid_{m}": v for m, v in result.valid.items()},
                                 **{f"test_{m}": v for m, v in result.test.items()},
                                 "seconds": result.seconds})
                    progress(f"[{len(rows)}/{total}] {method} {entry} on "
                             f"{rows[-1]['plan']}: valid NDCG@20 "
                             f"{result.valid['ndcg@20']:.4f}")
        frame = pd.DataFrame(rows)
        frame.to_csv(folder / "tuning.csv", index=False)
        chosen = {method: {"settings": grid[method][pick["candidate"]],
                           "grid": grids[method], "mean_valid_ndcg@20": pick["scores"]}
                  for method, pick in select(frame).items()}
        record = {"criterion": CRITERION, "budget": budget,
                  "tuning_plans": [plan_of(d) for d in data], "methods": chosen}
        (folder / "chosen.json").write_text(json.dumps(record, indent=2))
    return folder, record


def load_chosen(path: str | Path) -> dict[str, list[str]]:
    """``--set`` lists per method from a ``chosen.json`` of :func:`tune_learning`."""
    try:
        record = json.loads(Path(path).read_text())
        methods = record["methods"]
        return {m: [f"{k}={_toml(v)}" for k, v in entry["settings"].items()]
                for m, entry in methods.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FedShareError(f"{path} is not a chosen.json of fedshare tune-learning ({exc})"
                            ) from None
