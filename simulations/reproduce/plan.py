"""Which cells each target of ``fedshare reproduce`` needs: the experiment design in one place.

Protocol (the report states it; FedShare Sec. V-A/V-D, CAU Sec. 5.1):

- **Seeds.** Reported seed s is plan s:s (split seed s, sharing plan seed s) and model seed s,
  for s = 0 .. seeds-1. Settings are chosen on the tuning plan 100:100 (``--tuning-plans 2``
  adds 101:101, as ``fedshare tune-learning`` and ``tune-unlearning`` do), never on a
  reported plan. One plan by default: the search is a fifth of ``all``'s work per plan, and
  the hour on 2 cores does not hold two.
- **Tuning (Sec. V-D), the same budget for every tuned method.** A coordinate search: each
  stage tries the values of one setting with the others at their best so far (first value =
  the default), on validation NDCG@20 averaged over the tuning plans, ties to the earlier.
  Learning: FedShare's temperature over the paper's {0.05, 0.1, 0.2, 0.5, 1.0}, then lambda1
  over {0.1, 0.3, 0.5, 0.7} (8 runs); CDCGNNFed its mending ratio, temperature and lambda1 (8);
  PDC-FRS its auxiliary weight and augmented positives (8). Unlearning (one cell: the learned
  federations are shared by every candidate): FedShare's L_CU temperature over the same five
  values, then M over {1, 2, 3, 5, 10} (9 candidates); FRU's lambda over 9 values; CUFRU's
  interval, then its lambda (9); the score is ``fedshare tune-unlearning``'s (validation utility
  against Retrain plus the canary excess removed). The ablations run at FedShare's choice.
  FedShare-FedAvg and no sharing have no setting of their own to tune.
- **Sweeps (Fig. 5)**, on the reported plans at the chosen settings, HR@20 as in the paper:
  (a) the user-type ratio full:partial:none in {0.5:1:8.5, 1:2:7, 3:4:3} for the four
  learning methods; (b) lambda1 over the paper's four values; (c) M over {1, 2, 3, 5, 10};
  (d) gamma over {0.1, ..., 0.5} for FedShare, FRU and CUFRU (Retrain, the reference, is in
  the main table at gamma 0.3).
- **CAU (Tables 1-4)**: ``fedshare cau-table``'s settings (its docstrings give the choices:
  batch 16 on ML-100K, the paper's epochs), split seeds 0 .. seeds-1, the paper's methods
  (the four variants, Original, Retrain; the ablations on SASRec, as Table 4), except that
  the Original and Retrain train each round's devices as one batch (``seq-batched``: the
  same FedAvg update of one local SGD step, with dropout masks drawn per batch instead of per
  device), 5-10x faster a round; ``fedshare cau-table`` keeps the per-device path.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedshare.errors import FedShareError
from simulations.reproduce.cells import Args, Cell

TARGETS = ("table3", "table4", "fig4", "fig5", "cau", "all")
PAPER_TAU = (0.5, 0.05, 0.1, 0.2, 1.0)  # Sec. V-D's grid, the default first
PAPER_LAMBDA1 = (0.5, 0.1, 0.3, 0.7)
PAPER_SNAPSHOTS = (5, 1, 2, 3, 10)
LEARNING_AXES: dict[str, list[dict[str, Sequence[Any]]]] = {
    "fedshare": [{"tau": PAPER_TAU}, {"lambda1": PAPER_LAMBDA1}],
    "cdcgnnfed": [{"mend-ratio": (0.1, 0.05, 0.2)}, {"tau": (0.5, 0.2, 1.0)},
                  {"lambda1": PAPER_LAMBDA1}],
    "pdc-frs": [{"pdc-weight": (0.01, 0.001, 0.1, 0.3, 1.0)}, {"pdc-augment": (5, 0, 10, 20)}],
}
UNLEARNING_AXES: dict[str, list[dict[str, Sequence[Any]]]] = {
    "fedshare": [{"tau": PAPER_TAU}, {"snapshots": PAPER_SNAPSHOTS}],
    "fru": [{"epoch_fraction": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)}],
    "cufru": [{"interval": (10, 5, 20, 15, 30)}, {"epoch_fraction": (0.1, 0.2, 0.3, 0.5, 0.7)}],
}
LEARNING_METHODS = ("fedshare", "fedshare-fedavg", "pdc-frs", "cdcgnnfed", "wo-cl", "wo-bpr",
                    "no-sharing")
UNLEARNING_METHODS = ("no-unlearning", "fedshare", "wo-forgotten-graph", "wo-remaining-fl",
                      "fru", "cufru", "retrain")
GROUPS = ((0.05, 0.1, 0.85), (0.1, 0.2, 0.7), (0.3, 0.4, 0.3))
DEFAULT_GROUPS = (0.1, 0.2, 0.7)
USER_SWEEP_METHODS = ("fedshare", "fedshare-fedavg", "cdcgnnfed", "pdc-frs")
SNAPSHOTS = (1, 2, 3, 5, 10)
GAMMAS = (0.1, 0.2, 0.3, 0.4, 0.5)
GAMMA_METHODS = ("fedshare", "fru", "cufru")  # the baselines of Fig. 5(d); Retrain is the reference
CAU_METHODS = ("original", "retrain", "cau-gradient-hard", "cau-gradient-soft",
               "cau-embedding-hard", "cau-embedding-soft")
CAU_ABLATIONS = ("ga", "wo-ps", "wo-cu")  # Table 4: SASRec only
BACKBONES = ("sasrec", "gru4rec")
TUNING_PLANS = ((100, 100), (101, 101))
# estimated seconds on one core (ML-100K, 100 rounds): the progress bar and the ordering
COST = {"fedshare": 18, "cdcgnnfed": 21, "fedshare-fedavg": 6, "pdc-frs": 7, "wo-cl": 6,
        "wo-bpr": 17, "no-sharing": 2, "unlearn": 90, "gamma": 110, "tune-unlearn": 420,
        "cau-original": 45, "cau-retrain": 45, "cau-sasrec": 25, "cau-gru4rec": 18}


@dataclass(frozen=True)
class Design:
    """Everything the cells depend on; a resumed folder must have the same."""

    target: str
    dataset: str = "ml-100k"
    data_path: str | None = None
    seeds: int = 3
    quick: bool = False
    tuning: int = 1

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise FedShareError(f"unknown target {self.target!r}; one of {', '.join(TARGETS)}")
        if not 1 <= self.seeds <= 99:
            raise FedShareError(f"--seeds must be between 1 and 99, got {self.seeds}")
        if not 1 <= self.tuning <= len(TUNING_PLANS):
            raise FedShareError(f"--tuning-plans must be 1 or 2, got {self.tuning}")

    def record(self) -> dict:
        return {"target": self.target, "dataset": self.dataset, "data_path": self.data_path,
                "seeds": list(range(self.seeds)), "quick": self.quick,
                "tuning_plans": [f"{a}:{b}" for a, b in self.tuning_plans]}

    @property
    def sets(self) -> list[str]:
        """Run settings of every LightGCN-family run (the dataset; ``--quick``: tiny)."""
        out = [f"dataset={json.dumps(self.dataset)}"]
        if self.data_path:
            out.append(f"data-path={json.dumps(str(Path(self.data_path).resolve()))}")
        return out + (["rounds=3", "eval-every=1"] if self.quick else [])

    @property
    def unlearning_base(self) -> dict:
        return {"rounds": 2, "steps": 2} if self.quick else {}

    @property
    def tuning_plans(self) -> tuple[tuple[int, int], ...]:
        return TUNING_PLANS[:self.tuning]

    def axes(self, table: Mapping[str, list[dict[str, Sequence[Any]]]]
             ) -> dict[str, list[dict[str, Sequence[Any]]]]:
        if not self.quick:
            return dict(table)
        return {m: [{k: v[:2] for k, v in stage.items()} for stage in stages[:2]]
                for m, stages in table.items()}

    def pick(self, values: Sequence[Any]) -> tuple[Any, ...]:
        """A sweep's values (``--quick``: the first two)."""
        return tuple(values[:2]) if self.quick else tuple(values)

    @property
    def cau(self) -> dict:
        # the Original and Retrain train a node's devices as one batch (seq-batched: the same
        # FedAvg update, dropout drawn per batch): what lets `all` fit an hour on 2 cores
        fed = {"batched": True, **({"rounds": 2, "eval_every": 1} if self.quick else {})}
        cau = {"epochs": 1} if self.quick else {}
        return {"dataset": self.dataset, "data_path": self.data_path, "fed": fed, "cau": cau}

    def scale(self, cost: float) -> float:
        return cost / 30 if self.quick else cost


def _value_key(value: Any) -> str:
    return str(value).replace(".", "p")


def tuning_key(method: str, key: str, value: Any, plan: Sequence[int]) -> str:
    return f"tune-{method}-{key}={_value_key(value)}-p{plan[0]}"


def best_learning(method: str, stages: Sequence[Mapping[str, Sequence[Any]]],
                  results: Mapping[str, dict], upto: int) -> dict[str, Any]:
    """The best settings of ``method`` after ``upto`` stages (coordinate search; mean valid
    NDCG@20 over the tuning plans, ties to the earlier candidate)."""
    best = {k: v[0] for stage in stages for k, v in stage.items()}
    tried: list[tuple[dict, float]] = []
    for stage in stages[:upto]:
        ((key, values),) = stage.items()
        for value in values:
            candidate = {**best, key: value}
            if any(candidate == t for t, _ in tried):
                continue
            scores = [r["valid_ndcg@20"] for r in results.values()
                      if r.get("method") == method and r.get("settings") == candidate]
            if scores:
                tried.append((candidate, float(np.mean(scores))))
        if tried:
            best = max(tried, key=lambda t: t[1])[0]  # max keeps the first of equals
    return best


def _tuning_cells(design: Design) -> tuple[list[Cell], dict[str, tuple[str, ...]]]:
    """The learning search: per method and stage, one cell per new value and tuning plan."""
    cells: list[Cell] = []
    keys_of: dict[str, tuple[str, ...]] = {}
    for method, stages in design.axes(LEARNING_AXES).items():
        earlier: list[str] = []
        defaults = {k: v[0] for stage in stages for k, v in stage.items()}
        for index, stage in enumerate(stages):
            ((key, values),) = stage.items()
            this: list[str] = []
            for value in values:
                if index > 0 and value == defaults[key]:
                    continue  # ran in an earlier stage, at the best settings then
                for plan in design.tuning_plans:
                    def build(args: Args, deps: Mapping[str, dict], method=method,
                              stages=stages, index=index, key=key, value=value) -> Args:
                        best = best_learning(method, stages, deps, index)
                        return {**args, "settings": {**best, key: value}}

                    cell_key = tuning_key(method, key, value, plan)
                    cells.append(Cell(cell_key, "simulations.reproduce.work:learning_run",
                                      {"method": method, "split_seed": plan[0],
                                       "plan_seed": plan[1], "seed": 0, "sets": design.sets},
                                      design.scale(COST[method]), tuple(earlier), build))
                    this.append(cell_key)
            earlier += this
        keys_of[method] = tuple(earlier)
    return cells, keys_of


def chosen_learning(design: Design, results: Mapping[str, dict]) -> dict[str, dict]:
    """Every tuned learning method's chosen settings, from the tuning cells' results."""
    return {m: best_learning(m, stages, results, len(stages))
            for m, stages in design.axes(LEARNING_AXES).items()}


def settings_for(method: str, chosen: Mapping[str, dict]) -> dict[str, Any]:
    """A learning method's settings: its own choice, FedShare's for its ablations."""
    if method in chosen:
        return dict(chosen[method])
    if method in ("wo-cl", "wo-bpr"):
        return dict(chosen.get("fedshare", {}))
    return {}


def build_cells(design: Design, folder: Path) -> list[Cell]:
    """Every cell ``design.target`` needs (shared cells have one key whatever the target)."""
    target = design.target
    wants = {t: target in (t, "all") for t in TARGETS if t != "all"}
    seeds = range(design.seeds)
    cells: list[Cell] = []
    lightgcn = wants["table3"] or wants["table4"] or wants["fig4"] or wants["fig5"]
    tuning, keys_of = _tuning_cells(design) if lightgcn else ([], {})
    cells += tuning
    fedshare_tuning = keys_of.get("fedshare", ())
    learn_methods: list[str] = []
    if wants["table3"]:
        learn_methods += ["fedshare", "fedshare-fedavg", "pdc-frs", "cdcgnnfed", "no-sharing"]
    if wants["table4"]:
        learn_methods += ["fedshare", "wo-cl", "wo-bpr"]
    if wants["fig5"]:
        learn_methods += list(USER_SWEEP_METHODS)
    for method in dict.fromkeys(learn_methods):
        deps = keys_of.get(method if method in keys_of else "fedshare", ()) \
            if method in (*keys_of, "wo-cl", "wo-bpr") else ()
        for s in seeds:
            cells.append(_learn_cell(design, f"learn-{method}-s{s}", method, s, deps))
    if wants["fig5"]:
        for groups in design.pick([g for g in GROUPS if g != DEFAULT_GROUPS]):
            label = "_".join(_value_key(g) for g in groups)
            for method in USER_SWEEP_METHODS:
                for s in seeds:
                    cells.append(_learn_cell(design, f"users-{label}-{method}-s{s}", method, s,
                                             keys_of.get(method, ()), groups=groups))
        for value in design.pick(PAPER_LAMBDA1):
            for s in seeds:
                cells.append(_learn_cell(design, f"lambda1={_value_key(value)}-s{s}",
                                         "fedshare", s, fedshare_tuning, lambda1=value))
    unlearning = wants["table3"] or wants["table4"] or wants["fig4"] or wants["fig5"]
    if unlearning:
        cells.append(_tune_unlearning_cell(design, fedshare_tuning))
        after = (*fedshare_tuning, "tune-unlearn")
        for s in seeds:
            cells.append(_unlearning_cell(design, f"unlearn-s{s}", s, after))
        if wants["fig5"]:
            gammas = [g for g in design.pick([0.1, 0.5, 0.2, 0.4]) if g != 0.3]
            for s in seeds:
                cells.append(_gamma_cell(design, f"gamma-s{s}", s, after, gammas))
    if wants["cau"]:
        cells += _cau_cells(design, folder)
    return cells


def _learn_cell(design: Design, key: str, method: str, seed: int, deps: Sequence[str],
                groups: Sequence[float] | None = None, lambda1: float | None = None) -> Cell:
    def build(args: Args, results: Mapping[str, dict]) -> Args:
        settings = settings_for(method, chosen_learning(design, results))
        if lambda1 is not None:
            settings["lambda1"] = lambda1
        return {**args, "settings": settings}

    args: Args = {"method": method, "split_seed": seed, "plan_seed": seed, "seed": seed,
                  "sets": design.sets, "groups": list(groups) if groups else None}
    return Cell(key, "simulations.reproduce.work:learning_run", args,
                design.scale(COST[method]), tuple(deps), build)


def _tune_unlearning_cell(design: Design, deps: Sequence[str]) -> Cell:
    def build(args: Args, results: Mapping[str, dict]) -> Args:
        return {**args, "learning": chosen_learning(design, results).get("fedshare", {})}

    args: Args = {"plans": [list(p) for p in design.tuning_plans], "seed": 0,
                  "sets": design.sets, "base": design.unlearning_base,
                  "axes": design.axes(UNLEARNING_AXES), "canaries": 5,
                  "max_snapshots": max(SNAPSHOTS)}
    return Cell("tune-unlearn", "simulations.reproduce.work:tune_unlearning", args,
                design.scale(COST["tune-unlearn"]) * len(design.tuning_plans) / 2,
                tuple(deps), build)


def _with_chosen(design: Design) -> Any:
    def build(args: Args, results: Mapping[str, dict]) -> Args:
        return {**args, "learning": chosen_learning(design, results).get("fedshare", {}),
                "chosen": results["tune-unlearn"]["chosen"]}
    return build


def _unlearning_cell(design: Design, key: str, seed: int, deps: Sequence[str]) -> Cell:
    args: Args = {"split_seed": seed, "plan_seed": seed, "seed": seed, "sets": design.sets,
                  "base": design.unlearning_base, "methods": list(UNLEARNING_METHODS),
                  "sweep_snapshots": list(design.pick(SNAPSHOTS) if not design.quick
                                          else (1, 10))}
    return Cell(key, "simulations.reproduce.work:unlearning_seed", args,
                design.scale(COST["unlearn"]), tuple(deps), _with_chosen(design))


def _gamma_cell(design: Design, key: str, seed: int, deps: Sequence[str],
                gammas: Sequence[float]) -> Cell:
    args: Args = {"split_seed": seed, "plan_seed": seed, "seed": seed, "sets": design.sets,
                  "base": design.unlearning_base, "methods": list(GAMMA_METHODS),
                  "gammas": list(gammas)}
    return Cell(key, "simulations.reproduce.work:gamma_seed", args,
                design.scale(COST["gamma"]) * len(gammas) / 4, tuple(deps),
                _with_chosen(design))


def _cau_cells(design: Design, folder: Path) -> list[Cell]:
    cells = []
    for backbone in BACKBONES:
        methods = CAU_METHODS + (CAU_ABLATIONS if backbone == "sasrec" else ())
        for s in range(design.seeds):
            base = {"folder": str(folder), "backbone": backbone, "seed": s, **design.cau}
            orig = f"cau-{backbone}-original-s{s}"
            cells.append(Cell(orig, "simulations.reproduce.cau_work:cau_original", base,
                              design.scale(COST["cau-original"])))
            for method in methods:
                cost = COST["cau-retrain"] if method == "retrain" else \
                    1 if method == "original" else COST[f"cau-{backbone}"]
                cells.append(Cell(f"cau-{backbone}-{method}-s{s}-row",
                                  "simulations.reproduce.cau_work:cau_method",
                                  {**base, "method": method}, design.scale(cost), (orig,)))
    return cells
