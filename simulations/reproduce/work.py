"""What one cell of ``fedshare reproduce`` computes (each function runs in a worker process).

Every function takes JSON arguments and returns a JSON object, so a finished cell is a file.
The reported runs and the tuning runs are the same functions on different plans: a plan is
(split seed, plan seed), prepared in memory by :func:`simulations.plans.fresh_plan`, and the
model seed of a reported cell is its split seed (seed s = plan s:s, model seed s).

All runs are the in-process engine: the Flower app's client, aggregation and server code in
one process (tests check both engines give the same model), one torch thread per worker.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedshare.data.prepared import PreparedData
from fedshare.errors import FedShareError
from fedshare.federated.inprocess import run_inprocess
from fedshare.unlearning.config import UnlearningConfig
from fedshare.unlearning.fru_selection import FruSettings
from fedshare.unlearning.phase import learn, unlearn
from fedshare.unlearning.remaining import add_canaries
from fedshare.unlearning.report import unlearning_row
from simulations.experiment import Experiment, resolve
from simulations.plans import fresh_plan
from simulations.tuning import method_configs, score_frame

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
UNLEARNING_COLUMNS = ("test_hr@20", "test_ndcg@20", "valid_hr@20", "valid_ndcg@20",
                      "forgotten_hr@20", "mia_auc", "top20_jaccard", "canary_exposure",
                      "seconds", "kept_bytes", "client_bytes", "server_bytes", "bytes_down",
                      "bytes_up")


def _settings_sets(settings: Mapping[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in settings.items()]


def experiment(method: str, seed: int, sets: Sequence[str] = (),
               settings: Mapping[str, Any] | None = None) -> Experiment:
    """``simulations/configs/<method>.toml`` with the run's ``sets`` and a method's chosen
    ``settings`` over it, at model seed ``seed``."""
    return resolve(CONFIGS / f"{method}.toml",
                   [*sets, *_settings_sets(settings or {}), f"seed={seed}"], name=method)


def plan(exp: Experiment, split_seed: int, plan_seed: int, groups: Sequence[float] | None = None,
         gamma: float | None = None) -> PreparedData:
    return fresh_plan(exp.run, split_seed, plan_seed, groups, gamma)


def shared_fraction(data: PreparedData) -> float:
    return float(np.mean(data.plan.shared))


def learning_run(method: str, split_seed: int, plan_seed: int, seed: int,
                 sets: Sequence[str] = (), settings: Mapping[str, Any] | None = None,
                 groups: Sequence[float] | None = None) -> dict:
    """One learning-phase run: validation and test metrics, seconds, and the validation
    points of the learning curve."""
    torch.set_num_threads(1)
    exp = experiment(method, seed, sets, settings)
    data = plan(exp, split_seed, plan_seed, groups)
    result = run_inprocess(data, exp.config)
    return {"method": method, "split_seed": split_seed, "plan_seed": plan_seed, "seed": seed,
            "settings": dict(settings or {}), "groups": list(groups) if groups else None,
            "shared_fraction": shared_fraction(data),
            **{f"valid_{k}": v for k, v in result.valid.items()},
            **{f"test_{k}": v for k, v in result.test.items()},
            "seconds": result.seconds,
            "curve": [{"round": int(h["round"]), "valid_hr@20": h["valid_hr@20"],
                       "valid_ndcg@20": h["valid_ndcg@20"]} for h in result.history]}


def _row(outcome, data: PreparedData, retrain, canaries=None, **extra: Any) -> dict:
    row = unlearning_row(outcome, data, canaries, retrain)
    return {**extra, "method": outcome.method,
            **{c: row[c] for c in UNLEARNING_COLUMNS if c in row}}


def unlearning_config(base: Mapping[str, Any]) -> UnlearningConfig:
    return UnlearningConfig(**base)


def _method(learned, data, method: str, chosen: Mapping[str, Any], base: UnlearningConfig,
            rounds: int, snapshots: int | None = None):
    """``method`` from a copy of ``learned``, at its chosen settings (FedShare's methods keep
    the newest ``snapshots`` of the learned server's snapshots)."""
    settings = {k: v for k, v in chosen.items() if k != "snapshots"}
    config, replay = method_configs(method, settings, base) if method in (
        "fedshare", "wo-forgotten-graph", "wo-remaining-fl", "fru", "cufru") else (base, None)
    source = learned
    if snapshots is not None:
        source = copy.deepcopy(learned)  # its ledger then counts the newest M alone
        source.server.snapshots.keep_last(snapshots)
    return unlearn(source, data, method, config, rounds, replay)


def unlearning_seed(split_seed: int, plan_seed: int, seed: int, sets: Sequence[str],
                    learning: Mapping[str, Any], chosen: Mapping[str, Mapping[str, Any]],
                    base: Mapping[str, Any], methods: Sequence[str],
                    sweep_snapshots: Sequence[int]) -> dict:
    """One seed of the unlearning phase: learn once (FedShare at its chosen learning settings,
    keeping the largest M of the sweep and the FRU / CUFRU histories), then every method of
    ``methods`` from that state at its chosen settings, and FedShare at every M of
    ``sweep_snapshots`` (learning does not depend on M: the server keeps the newest M)."""
    torch.set_num_threads(1)
    exp = experiment("fedshare", seed, [*sets, f"snapshots={max(sweep_snapshots)}"], learning)
    data = plan(exp, split_seed, plan_seed)
    config, base_config = exp.config, unlearning_config(base)
    started = time.perf_counter()
    learned = learn(data, config, record=True, fru=FruSettings())
    learn_seconds = time.perf_counter() - started
    fedshare_m = int(chosen.get("fedshare", {}).get("snapshots", config.snapshots))
    retrain = unlearn(learned, data, "retrain", base_config, config.rounds)
    rows = []
    for method in methods:
        if method == "retrain":
            outcome = retrain
        else:
            m = fedshare_m if method in ("fedshare", "wo-forgotten-graph",
                                         "wo-remaining-fl") else None
            outcome = _method(learned, data, method, chosen.get(
                "fedshare" if m is not None else method, {}), base_config, config.rounds, m)
        rows.append(_row(outcome, data, retrain, seed=seed))
    sweep = []
    for m in sweep_snapshots:
        outcome = _method(learned, data, "fedshare", chosen.get("fedshare", {}), base_config,
                          config.rounds, int(m))
        sweep.append(_row(outcome, data, retrain, seed=seed, snapshots=int(m)))
    return {"seed": seed, "learn_seconds": learn_seconds, "fedshare_snapshots": fedshare_m,
            "methods": rows, "snapshots": sweep}


def gamma_seed(split_seed: int, plan_seed: int, seed: int, sets: Sequence[str],
               learning: Mapping[str, Any], chosen: Mapping[str, Mapping[str, Any]],
               base: Mapping[str, Any], methods: Sequence[str], gammas: Sequence[float]
               ) -> dict:
    """The unsharing-ratio sweep of one seed: the sharing plan draws who shares what before
    who unshares, so every gamma has the same learning phase (checked); learn once, then let
    each gamma's unsharing users leave a copy of it."""
    torch.set_num_threads(1)
    exp = experiment("fedshare", seed, [*sets, "snapshots=10"], learning)
    config, base_config = exp.config, unlearning_config(base)
    learned_on = plan(exp, split_seed, plan_seed)
    learned = learn(learned_on, config, record=True, fru=FruSettings())
    m = int(chosen.get("fedshare", {}).get("snapshots", config.snapshots))
    rows = []
    for gamma in gammas:
        data = plan(exp, split_seed, plan_seed, gamma=float(gamma))
        if not (np.array_equal(data.plan.shared, learned_on.plan.shared)
                and np.array_equal(data.plan.group, learned_on.plan.group)):
            raise FedShareError("the sharing plan changed with gamma: the sweep needs one "
                                "learning phase for every gamma")
        retrain = unlearn(learned, data, "retrain", base_config, config.rounds)
        for method in methods:
            outcome = retrain if method == "retrain" else _method(
                learned, data, method, chosen.get(method, {}), base_config, config.rounds,
                m if method == "fedshare" else None)
            rows.append(_row(outcome, data, retrain, seed=seed, gamma=float(gamma)))
    return {"seed": seed, "rows": rows}


def tune_unlearning(plans: Sequence[Sequence[int]], seed: int, sets: Sequence[str],
                    learning: Mapping[str, Any], base: Mapping[str, Any],
                    axes: Mapping[str, Sequence[Mapping[str, Sequence]]], canaries: int,
                    max_snapshots: int) -> dict:
    """Every unlearning method's search on the tuning plans, in one process: the learned
    federations (one per plan, FedShare at its chosen learning settings) are shared by every
    candidate, and a coordinate search needs the scores over all plans before its next axis.

    ``axes[method]``: a list of stages, each ``{key: values}`` with one key; stage k tries
    the values of its key with the earlier keys at their best so far (the first value of each
    key is its default, so a later stage's first value was already run). The score is
    :func:`simulations.tuning.score_frame`'s: validation utility against Retrain plus the
    fraction of the canary excess removed, from ``canaries`` common canaries per unsharing
    user; the best mean over the plans wins, ties to the earlier candidate.
    """
    torch.set_num_threads(1)
    exp = experiment("fedshare", seed, [*sets, f"snapshots={max_snapshots}"], learning)
    config, base_config = exp.config, unlearning_config(base)
    cases = []
    for split_seed, plan_seed in plans:
        clean = plan(exp, split_seed, plan_seed)
        data, canary_set = add_canaries(clean, canaries, seed, common=True)
        learned = learn(data, config, record=True, fru=FruSettings())
        retrain = unlearn(learned, data, "retrain", base_config, config.rounds)
        none = unlearn(learned, data, "no-unlearning", base_config, config.rounds)
        cases.append((f"{split_seed}:{plan_seed}", data, canary_set, learned, retrain, none))
    rows: list[dict] = []
    for label, data, canary_set, _, retrain, none in cases:
        for ref in (retrain, none):
            rows.append(_row(ref, data, retrain, canary_set, plan=label, setting=-1,
                             settings="{}"))
    chosen: dict[str, dict] = {}
    tried: dict[str, list[dict]] = {}
    for method, stages in axes.items():
        best: dict[str, Any] = {k: v[0] for stage in stages for k, v in stage.items()}
        tried[method] = []
        for stage in stages:
            ((key, values),) = stage.items()
            for value in values:
                candidate = {**best, key: value}
                if candidate in tried[method]:
                    continue
                tried[method].append(candidate)
                index = len(tried[method]) - 1
                for label, data, canary_set, learned, retrain, _ in cases:
                    snapshots = candidate.get("snapshots") if method == "fedshare" else None
                    outcome = _method(learned, data, method, candidate, base_config,
                                      config.rounds, snapshots)
                    rows.append(_row(outcome, data, retrain, canary_set, plan=label,
                                     setting=index, settings=json.dumps(candidate)))
            best = tried[method][_best(rows, method)]
        chosen[method] = best
    return {"rows": rows, "chosen": chosen, "budget": {m: len(t) for m, t in tried.items()}}


def _best(rows: list[dict], method: str) -> int:
    import pandas as pd

    frame = pd.DataFrame(rows)
    scored = score_frame(frame[frame["method"].isin([method, "retrain", "no-unlearning"])])
    means = scored.groupby("setting", sort=True)["score"].mean()
    return int(means.index[int(np.argmax(means.to_numpy()))])
