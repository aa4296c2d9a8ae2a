"""Choosing every unlearning method's settings on plans nobody reports on (issue 15).

``fedshare tune-unlearning`` gives FedShare, its two ablations (w/o forgotten graph, w/o remaining
FL), its named variant fedshare-reset, FRU and CUFRU the same search:

- **Tuning plans**, disjoint from the reported ones: by default two (split seed : plan seed)
  pairs, 100:100 and 101:101, of the run config's dataset with its default user ratio and gamma
  (``--plans``, ``--groups``, ``--gamma``). Each is prepared in memory, gets the canary audit
  (:func:`fedshare.unlearning.remaining.add_canaries`: 5 common canaries per unsharing user),
  and learns once with the FRU and CUFRU histories recorded; Retrain and no-unlearning run once.
- **The same budget**: every method runs at the first ``budget`` entries (default 6) of its grid
  in ``simulations/tuning_grids.toml`` (the product of its axes, defaults first), from
  the same learned state. A grid shorter than the budget is refused.
- **The criterion, on validation only** (test metrics are recorded in ``tuning.csv`` but never
  read). Per candidate and tuning plan::

      score = min(1, valid NDCG@20 / Retrain's valid NDCG@20)
            + min(1, (E_none - E) / (E_none - E_retrain))

  where ``E`` is the canary exposure over the unsharing users who still hold data
  (``canary_exposure`` of :func:`fedshare.unlearning.report.unlearning_row`), ``E_none`` that of
  no-unlearning and ``E_retrain`` Retrain's: the fraction of the canary excess removed, capped at
  1 (forgetting more than Retrain earns nothing; utility above Retrain's earns nothing either).
  A term a plan cannot measure (Retrain's NDCG 0, no canary excess, no canary user with data)
  counts 0 for every candidate of that plan. The scores are averaged over the tuning plans; the
  best mean wins, ties to the earlier grid entry. The canaries are planted in the tuning plans
  only; the reported plans are never looked at.

The command writes a leased folder with ``tuning.csv`` (method, setting, plan, every metric,
the two terms and the score) and ``chosen.json`` (per method: the chosen settings, its grid,
the mean scores, the budget and the tuning plans with their identity from
:func:`simulations.plans.plan_of`). ``fedshare unlearning-table --settings chosen.json --plans
...`` then reports every method at its chosen settings on fresh plans (:func:`load_chosen`).
"""

from __future__ import annotations

import itertools
import json
import math
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fedshare.errors import FedShareError
from fedshare.unlearning.config import UnlearningConfig
from fedshare.unlearning.phase import FEDSHARE_METHODS, learn, unlearn
from fedshare.unlearning.remaining import add_canaries
from fedshare.unlearning.replay import ReplayConfig
from fedshare.unlearning.report import unlearning_row
from simulations.experiment import leased_folder, resolve
from simulations.plans import LEARNING_PLANS, fresh_plan, label, plan_of

CONFIGS = Path(__file__).parent / "configs"
GRIDS = Path(__file__).parent / "tuning_grids.toml"
TUNING_PLANS = ((100, 100), (101, 101))
BUDGET = 6
REPLAY_METHODS = ("fru", "cufru")
TUNED = (*FEDSHARE_METHODS, *REPLAY_METHODS)
REFERENCES = ("no-unlearning", "retrain")
UNLEARNING_FIELDS = tuple(f.name for f in fields(UnlearningConfig)
                          if f.name not in ("forgotten_graph", "remaining_fl"))
# alpha (FRU's stored fraction) acts while learning, not in the replay: not a replay setting
REPLAY_FIELDS = tuple(f.name for f in fields(ReplayConfig) if f.name != "alpha")
FORMAT = 1
CRITERION = ("mean over the tuning plans of min(1, valid_ndcg@20 / retrain's) + min(1, "
             "(exposure_no_unlearning - exposure) / (exposure_no_unlearning - exposure_retrain)), "
             "canary exposure over the unsharing users who still hold data; ties to the earlier "
             "grid entry")


def method_configs(method: str, settings: Mapping[str, Any], unlearning: UnlearningConfig
                   ) -> tuple[UnlearningConfig, ReplayConfig | None]:
    """The configs ``unlearn`` runs ``method`` with: ``settings`` over ``unlearning`` for
    FedShare's methods, over :class:`ReplayConfig`'s defaults for FRU and CUFRU."""
    allowed = REPLAY_FIELDS if method in REPLAY_METHODS else UNLEARNING_FIELDS
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise FedShareError(f"{method} has no setting(s) {', '.join(unknown)}; "
                            f"choose among {', '.join(allowed)}")
    try:
        if method in REPLAY_METHODS:
            return unlearning, ReplayConfig(**settings)
        return replace(unlearning, **settings), None
    except (TypeError, ValueError, FedShareError) as exc:
        raise FedShareError(f"bad {method} settings {dict(settings)}: {exc}") from None


def load_grids(path: str | Path = GRIDS) -> dict[str, dict[str, list]]:
    """Every tuned method's axes, from a TOML file (one table per method)."""
    try:
        table = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise FedShareError(f"cannot read the grids {path}: {exc}") from None
    missing = [m for m in TUNED if m not in table]
    extra = sorted(set(table) - set(TUNED))
    if missing or extra:
        raise FedShareError(f"{path}: needs one table per method {', '.join(TUNED)}"
                            + (f"; unknown {', '.join(extra)}" if extra else ""))
    for method, axes in table.items():
        if not isinstance(axes, dict) or not axes or not all(
                isinstance(v, list) and v for v in axes.values()):
            raise FedShareError(f"{path}: [{method}] needs non-empty lists of values")
    return table


def first_entries(method: str, axes: Mapping[str, Sequence], budget: int) -> list[dict]:
    """The first ``budget`` entries of ``method``'s grid (the product of its axes, the first
    axis slowest); a grid shorter than the budget is refused: every method gets the same."""
    grid = [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]
    if len(grid) < budget:
        raise FedShareError(f"{method}'s grid has {len(grid)} entries, fewer than the "
                            f"budget {budget}: every method gets the same budget")
    return grid[:budget]


def candidates(grids: Mapping[str, Mapping[str, Sequence]], budget: int = BUDGET
               ) -> dict[str, list[dict]]:
    """The first ``budget`` entries of every method's grid (the product of its axes, the first
    axis slowest); every method gets exactly ``budget``, and every entry is checked."""
    if budget < 1:
        raise FedShareError(f"the budget must be >= 1, got {budget}")
    out = {}
    for method in TUNED:
        out[method] = first_entries(method, grids[method], budget)
        for settings in out[method]:
            method_configs(method, settings, UnlearningConfig())
    return out


def score_frame(metrics: pd.DataFrame) -> pd.DataFrame:
    """The candidates' rows of ``metrics`` with ``utility``, ``forgetting`` and ``score``
    (module docstring). ``metrics``: one row per (method, setting, plan) with ``method``,
    ``setting``, ``plan``, ``valid_ndcg@20``, ``canary_exposure``, and one row per plan for each
    of ``retrain`` and ``no-unlearning``."""
    refs = metrics[metrics["method"].isin(REFERENCES)].set_index(["method", "plan"])
    for ref in REFERENCES:
        if ref not in refs.index.get_level_values(0):
            raise FedShareError(f"the metrics have no {ref} row")
    rows = metrics[metrics["method"].isin(TUNED)].copy()
    retrain, none = refs.loc["retrain"], refs.loc["no-unlearning"]
    ndcg = rows["plan"].map(retrain["valid_ndcg@20"]).to_numpy(float)
    e_retrain = rows["plan"].map(retrain["canary_exposure"]).to_numpy(float)
    e_none = rows["plan"].map(none["canary_exposure"]).to_numpy(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        utility = np.where(ndcg > 0, rows["valid_ndcg@20"].to_numpy(float) / ndcg, np.nan)
        excess = e_none - e_retrain
        forgetting = np.where(excess > 0, (e_none - rows["canary_exposure"].to_numpy(float))
                              / excess, np.nan)
    rows["utility"] = np.minimum(1.0, utility)
    rows["forgetting"] = np.minimum(1.0, forgetting)
    rows["score"] = rows["utility"].fillna(0.0) + rows["forgetting"].fillna(0.0)
    return rows


def select(scored: pd.DataFrame) -> dict[str, dict]:
    """Per method: the chosen ``setting`` (grid index) and every setting's mean score over the
    plans; the best mean wins, ties to the earlier grid entry."""
    out = {}
    for method in [m for m in TUNED if m in set(scored["method"])]:
        mine = scored[scored["method"] == method]
        means = mine.groupby("setting", sort=True)["score"].mean()
        best = means.max()
        chosen = int(means.index[np.flatnonzero(means.to_numpy() == best)[0]])
        out[method] = {"setting": chosen, "score": float(best),
                       "scores": [float(s) for s in means.to_numpy()]}
    return out


def tune_unlearning(plans: Sequence[tuple[int, int]] = TUNING_PLANS,
                    groups: Sequence[float] | None = None, gamma: float | None = None,
                    sets: Sequence[str] = (), budget: int = BUDGET,
                    grids: Mapping[str, Mapping[str, Sequence]] | None = None, seed: int = 0,
                    canaries: int = 5, unlearning: UnlearningConfig | None = None,
                    out: str | Path = "runs", progress: Callable[[str], None] = print
                    ) -> tuple[Path, dict]:
    """Run the search (module docstring); return the folder and ``chosen.json``'s content."""
    if canaries < 1:
        raise FedShareError("tuning scores forgetting with the canary audit: --canaries >= 1")
    if not plans:
        raise FedShareError("tuning needs at least one plan")
    seeded = [s for s in sets if s.partition("=")[0].strip() in ("split-seed", "plan-seed",
                                                                "seed")]
    if seeded:
        raise FedShareError(f"--plans and --seed name the seeds; drop --set {seeded[0]}")
    unlearning = unlearning or UnlearningConfig()
    grid = candidates(grids if grids is not None else load_grids(), budget)
    experiment = resolve(CONFIGS / "fedshare.toml", [f"seed={seed}", *sets])
    config = experiment.config
    datas = [fresh_plan(experiment.run, s, p, groups, gamma) for s, p in plans]  # fail early
    identities = [plan_of(d) for d in datas]
    torch.set_num_threads(1)
    with leased_folder(out, "tune-unlearning") as folder:
        rows: list[dict] = []
        for clean, plan in zip(datas, identities, strict=True):
            where = {"plan": label(plan), "split_seed": plan["split_seed"],
                     "plan_seed": plan["plan_seed"]}
            data, canary_set = add_canaries(clean, canaries, seed, common=True)
            learned = learn(data, config, record=True)
            retrain = unlearn(learned, data, "retrain", unlearning, config.rounds)
            for ref in REFERENCES:
                outcome = retrain if ref == "retrain" else \
                    unlearn(learned, data, ref, unlearning, config.rounds)
                rows.append({"setting": -1, "settings": "{}", **where,
                             **unlearning_row(outcome, data, canary_set, retrain)})
            for method in TUNED:
                for index, settings in enumerate(grid[method]):
                    base, replay = method_configs(method, settings, unlearning)
                    outcome = unlearn(learned, data, method, base, config.rounds, replay)
                    row = unlearning_row(outcome, data, canary_set, retrain)
                    rows.append({"setting": index, "settings": json.dumps(settings), **where,
                                 **row})
                    progress(f"plan {where['plan']} {method:>19} {_text(settings)}: valid "
                             f"NDCG@20 {row['valid_ndcg@20']:.4f} canary "
                             f"{row.get('canary_exposure', math.nan):.4f} "
                             f"({row['seconds']:.1f} s)")
        frame = pd.DataFrame(rows)
        scored = score_frame(frame)
        frame = frame.join(scored[["utility", "forgetting", "score"]])
        first = ["method", "setting", "settings", "plan", "split_seed", "plan_seed"]
        frame = frame[first + [c for c in frame.columns if c not in first]]
        frame.to_csv(folder / "tuning.csv", index=False)
        picks = select(scored)
        chosen = {"format": FORMAT, "criterion": CRITERION, "budget": budget, "seed": seed,
                  "canaries": canaries, "sets": list(sets), "unlearning": unlearning.to_dict(),
                  "tuning_plans": identities,
                  "methods": {m: {"settings": grid[m][picks[m]["setting"]], **picks[m],
                                  "grid": grid[m], "tuning_plans": identities}
                              for m in TUNED}}
        (folder / "chosen.json").write_text(json.dumps(chosen, indent=2))
        return folder, chosen


def _text(settings: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in settings.items())


@dataclass(frozen=True)
class ChosenSettings:
    """A ``chosen.json`` read back: the settings every tuned method runs with, and where they
    were chosen."""

    path: Path
    unlearning: UnlearningConfig
    settings: dict[str, dict]
    tuning_plans: dict[str, list[dict]]

    def configs(self, method: str) -> tuple[UnlearningConfig, ReplayConfig | None]:
        """What ``method`` runs with (Retrain and no-unlearning: the base, no replay)."""
        if method not in self.settings:
            return self.unlearning, None
        return method_configs(method, self.settings[method], self.unlearning)

    def record(self) -> dict:
        """``summary.json``'s account of the settings used, per method."""
        out: dict[str, Any] = {"file": str(self.path)}
        for method in TUNED:
            base, replay = self.configs(method)
            out[method] = {"chosen": self.settings[method],
                           **({"replay": {k: getattr(replay, k) for k in REPLAY_FIELDS}}
                              if replay is not None else {"unlearning": base.to_dict()})}
        return out

    def plans(self) -> dict[str, list[dict]]:
        """``tuning_plans`` of a table's summary: per method, and the learning phase's."""
        return {**self.tuning_plans, "learning": LEARNING_PLANS}

    def all_plans(self) -> list[dict]:
        return [p for plans in self.tuning_plans.values() for p in plans]


PLAN_KEYS = {"dataset": str, "split_seed": int, "plan_seed": int, "groups": list,
             "gamma": (int, float)}


def load_chosen(path: str | Path) -> ChosenSettings:
    """Read and check a ``chosen.json`` of :func:`tune_unlearning`; anything malformed is one
    :class:`FedShareError`."""
    path = Path(path)
    try:
        chosen = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FedShareError(f"cannot read settings {path}: {exc}") from None

    def bad(why: str) -> FedShareError:
        return FedShareError(f"{path} is not a chosen.json of tune-unlearning: {why}")

    if not isinstance(chosen, dict) or chosen.get("format") != FORMAT:
        raise bad(f"no format {FORMAT}")
    methods = chosen.get("methods")
    if not isinstance(methods, dict) or sorted(methods) != sorted(TUNED):
        raise bad(f"'methods' must hold exactly {', '.join(TUNED)}")
    base = chosen.get("unlearning")
    if not isinstance(base, dict):
        raise bad("no 'unlearning' settings")
    try:
        unlearning = UnlearningConfig(**base)
    except (TypeError, ValueError, FedShareError) as exc:
        raise bad(f"bad 'unlearning' settings ({exc})") from None
    settings, plans = {}, {}
    for method in TUNED:
        entry = methods[method]
        if not isinstance(entry, dict) or not isinstance(entry.get("settings"), dict):
            raise bad(f"{method} has no 'settings' object")
        mine = entry.get("tuning_plans")
        if not isinstance(mine, list) or not mine or not all(
                isinstance(p, dict) and all(isinstance(p.get(k), t) and not isinstance(
                    p.get(k), bool) for k, t in PLAN_KEYS.items()) for p in mine):
            raise bad(f"{method} names no tuning plans (each with "
                      f"{', '.join(PLAN_KEYS)})")
        try:
            method_configs(method, entry["settings"], unlearning)
        except FedShareError as exc:
            raise bad(str(exc)) from None
        settings[method], plans[method] = dict(entry["settings"]), mine
    return ChosenSettings(path, unlearning, settings, plans)
