"""The cell runner and the experiment design of ``fedshare reproduce``: dependencies, resume,
failure, the critical-path order, the coordinate search, and that tuning never touches a
reported plan."""

from __future__ import annotations

import io
import json

import pytest

from fedshare.errors import FedShareError
from simulations.plans import fresh_plan
from simulations.reproduce.cells import Cell, Progress, ranks, run_cells
from simulations.reproduce.plan import (
    LEARNING_AXES,
    TUNING_PLANS,
    UNLEARNING_AXES,
    Design,
    best_learning,
    build_cells,
)
from simulations.reproduce.work import experiment


def _json_cell(key: str, payload: dict, deps: tuple[str, ...] = (), build=None,
               cost: float = 1.0) -> Cell:
    # json.loads(s=...) is a module-level function returning a dict: a worker can call it
    return Cell(key, "json:loads", {"s": json.dumps(payload)}, cost, deps, build)


def _plus_one(args, deps):
    (only,) = deps.values()
    return {"s": json.dumps({"x": only["x"] + 1})}


def test_dependencies_feed_their_results_and_everything_is_kept(tmp_path):
    cells = [_json_cell("a", {"x": 1}), _json_cell("b", {}, ("a",), _plus_one),
             _json_cell("c", {}, ("b",), _plus_one)]
    results = run_cells(tmp_path, cells, workers=2, stream=io.StringIO())
    assert [results[k]["x"] for k in "abc"] == [1, 2, 3]
    assert json.loads((tmp_path / "cells" / "c.json").read_text()) == {"x": 3}


def test_a_finished_cell_is_never_recomputed(tmp_path):
    run_cells(tmp_path, [_json_cell("a", {"x": 1})], stream=io.StringIO())
    before = (tmp_path / "cells" / "a.json").stat().st_mtime_ns
    # the same key now with arguments that would fail if they were run
    broken = Cell("a", "json:loads", {"s": "not json"})
    results = run_cells(tmp_path, [broken, _json_cell("b", {}, ("a",), _plus_one)],
                        stream=io.StringIO())
    assert results["b"] == {"x": 2}
    assert (tmp_path / "cells" / "a.json").stat().st_mtime_ns == before


def test_a_failing_cell_stops_the_run_and_keeps_what_finished(tmp_path):
    cells = [_json_cell("a", {"x": 1}, cost=10), Cell("bad", "json:loads", {"s": "{"}, 1.0,
                                                      ("a",))]
    with pytest.raises(json.JSONDecodeError):
        run_cells(tmp_path, cells, workers=1, stream=io.StringIO())
    assert sorted(p.name for p in (tmp_path / "cells").iterdir()) == ["a.json"]


def test_bad_graphs_are_refused(tmp_path):
    with pytest.raises(FedShareError, match="unknown"):
        run_cells(tmp_path, [_json_cell("a", {}, ("nowhere",))], stream=io.StringIO())
    with pytest.raises(FedShareError, match="share a key"):
        run_cells(tmp_path, [_json_cell("a", {}), _json_cell("a", {})], stream=io.StringIO())
    loop = [_json_cell("a", {}, ("b",), _plus_one), _json_cell("b", {}, ("a",), _plus_one)]
    with pytest.raises(FedShareError, match="wait on each other"):
        run_cells(tmp_path, loop, stream=io.StringIO())


def test_ranks_are_cost_plus_the_longest_chain_after():
    cells = [_json_cell("tune", {}, cost=5), _json_cell("long", {}, cost=20),
             _json_cell("report", {}, ("tune",), cost=30), _json_cell("x", {}, ("report",),
                                                                      cost=1)]
    assert ranks(cells) == {"tune": 36, "long": 20, "report": 31, "x": 1}


def test_progress_counts_cells_and_estimates_what_is_left():
    stream = io.StringIO()
    cells = [_json_cell(k, {}, cost=c) for k, c in (("a", 10), ("b", 30), ("c", 60))]
    progress = Progress(cells, {"a": {}}, stream)
    assert progress.remaining() is None  # no speed measured yet
    progress.cell_done("b", 3.0)
    line = stream.getvalue()
    assert "2/3 cells" in line and "b (3 s)" in line and "left ~" in line
    assert progress.left == 60


def test_coordinate_search_known_answer():
    stages = [{"tau": (0.5, 0.2, 1.0)}, {"lambda1": (0.5, 0.1)}]
    scores = {(0.5, 0.5): 0.20, (0.2, 0.5): 0.25, (1.0, 0.5): 0.25,  # tie: earlier wins
              (0.2, 0.1): 0.30, (0.5, 0.1): 0.99}  # (0.5, 0.1) is never a candidate
    results = {f"{t}-{lam}-{plan}": {"method": "m", "settings": {"tau": t, "lambda1": lam},
                                     "valid_ndcg@20": s + (0.01 if plan else -0.01)}
               for (t, lam), s in scores.items() for plan in (0, 1)}
    assert best_learning("m", stages, results, 1) == {"tau": 0.2, "lambda1": 0.5}
    assert best_learning("m", stages, results, 2) == {"tau": 0.2, "lambda1": 0.1}
    assert best_learning("other", stages, results, 2) == {"tau": 0.5, "lambda1": 0.5}


def test_every_tuned_method_has_the_same_budget():
    def budget(stages):
        return sum(len(v) for stage in stages for v in stage.values()) - (len(stages) - 1)

    assert {budget(s) for s in LEARNING_AXES.values()} == {8}
    assert {budget(s) for s in UNLEARNING_AXES.values()} == {9}


def test_tuning_never_runs_on_a_reported_plan(tmp_path):
    cells = build_cells(Design("all", seeds=3, tuning=2), tmp_path)
    tuning_seeds = {s for plan in TUNING_PLANS for s in plan}
    for cell in cells:
        args = cell.args
        if cell.key.startswith("tune-") and cell.key != "tune-unlearn":
            assert (args["split_seed"], args["plan_seed"]) in TUNING_PLANS
        elif cell.key == "tune-unlearn":
            assert {tuple(p) for p in args["plans"]} == set(TUNING_PLANS)
        else:
            seed = args.get("split_seed", args.get("seed"))
            assert seed in range(3) and seed not in tuning_seeds, cell.key
    assert len({c.key for c in cells}) == len(cells)


@pytest.mark.parametrize("target, prefixes", [
    ("table3", {"tune", "learn", "unlearn"}), ("table4", {"tune", "learn", "unlearn"}),
    ("fig4", {"tune", "unlearn"}), ("fig5", {"tune", "learn", "users", "lambda1=0p5",
                                             "lambda1=0p1", "lambda1=0p3", "lambda1=0p7",
                                             "unlearn", "gamma"}),
    ("cau", {"cau"})])
def test_each_target_builds_only_its_cells(tmp_path, target, prefixes):
    keys = {c.key.split("-")[0] for c in build_cells(Design(target, seeds=2), tmp_path)}
    assert keys == prefixes


def test_design_refuses_bad_input():
    with pytest.raises(FedShareError, match="unknown target"):
        Design("table9")
    with pytest.raises(FedShareError, match="--seeds"):
        Design("all", seeds=0)
    with pytest.raises(FedShareError, match="--seeds"):
        Design("all", seeds=100)
    with pytest.raises(FedShareError, match="--tuning-plans"):
        Design("all", tuning=3)


def test_every_gamma_shares_one_learning_phase():
    run = experiment("fedshare", 0).run
    low, high = (fresh_plan(run, 0, 0, gamma=g) for g in (0.1, 0.5))
    assert (low.plan.shared == high.plan.shared).all()
    assert (low.plan.group == high.plan.group).all()
    assert low.plan.unlearn.sum() < high.plan.unlearn.sum()


def test_quick_design_is_small(tmp_path):
    quick = build_cells(Design("all", quick=True, seeds=1), tmp_path)
    full = build_cells(Design("all", seeds=1), tmp_path)
    assert len(quick) < len(full)
    assert sum(c.cost for c in quick) < sum(c.cost for c in full) / 20


def test_results_are_readable_by_others(tmp_path):
    """Outputs go through fedshare.atomic: the user's usual mode, not mkstemp's 0600."""
    import os

    from fedshare.atomic import write_json

    write_json(tmp_path / "r.json", {"x": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o666 & ~umask
