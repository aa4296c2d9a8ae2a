"""The tuning protocol of issue 15: the selection rule by hand on a fake metrics table, the same
budget for every method, and tuning then reporting on a tiny dataset: disjoint plans named in
``summary.json``, the chosen settings used, and the refusals."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from synthetic import tiny_prepared

from fedshare.errors import FedShareError
from fedshare.unlearning.config import UnlearningConfig
from fedshare.unlearning.phase import METHODS
from simulations import unlearning_table as table_module
from simulations.cli import main
from simulations.plans import parse_plans, plan_of, seed_clash
from simulations.tuning import (
    BUDGET,
    TUNED,
    candidates,
    load_chosen,
    load_grids,
    score_frame,
    select,
    tune_unlearning,
)

TINY = ["rounds=2", "dim=8", "server-steps=1", "local-epochs=1"]
TINY_GRIDS = {**{m: {"lr": [0.03, 0.1], "rounds": [1]} for m in TUNED[:4]},
              "fru": {"epoch_fraction": [0.1, 1.0]},
              "cufru": {"interval": [1, 2], "epoch_fraction": [0.5]}}


def _row(method, setting, plan, ndcg, exposure):
    return {"method": method, "setting": setting, "plan": plan, "valid_ndcg@20": ndcg,
            "canary_exposure": exposure, "test_ndcg@20": 0.9}


def test_the_selection_is_the_documented_formula_by_hand():
    rows = [_row("retrain", -1, "a", 0.2, 0.2), _row("no-unlearning", -1, "a", 0.1, 1.0),
            _row("retrain", -1, "b", 0.4, 0.3), _row("no-unlearning", -1, "b", 0.3, 0.9)]
    # fedshare: (plan a, plan b) -> (valid NDCG, exposure)
    rows += [_row("fedshare", 0, "a", 0.1, 0.6), _row("fedshare", 0, "b", 0.4, 0.3),
             _row("fedshare", 1, "a", 0.3, 0.1), _row("fedshare", 1, "b", 0.2, 0.6),
             _row("fedshare", 2, "a", 0.2, 0.2), _row("fedshare", 2, "b", 0.36, 0.45)]
    # fru: two equal settings, and a better test score that must not count
    rows += [_row("fru", 0, "a", 0.2, 0.6), _row("fru", 0, "b", 0.4, 0.6),
             _row("fru", 1, "a", 0.2, 0.6), _row("fru", 1, "b", 0.4, 0.6)]
    frame = pd.DataFrame(rows)
    frame.loc[(frame["method"] == "fru") & (frame["setting"] == 1), "test_ndcg@20"] = 1.0
    scored = score_frame(frame)
    # by hand: min(1, ndcg / retrain's) + min(1, (E_none - E) / (E_none - E_retrain))
    hand = {(0, "a"): 0.1 / 0.2 + (1.0 - 0.6) / 0.8, (0, "b"): 1 + 1,
            (1, "a"): 1 + 1, (1, "b"): 0.2 / 0.4 + (0.9 - 0.6) / 0.6,  # (0.3/0.2, 0.9/0.8) capped
            (2, "a"): 1 + 1, (2, "b"): 0.36 / 0.4 + (0.9 - 0.45) / 0.6}
    mine = scored[scored["method"] == "fedshare"]
    for (setting, plan), value in hand.items():
        got = mine[(mine["setting"] == setting) & (mine["plan"] == plan)]["score"].item()
        assert got == pytest.approx(value)
    picks = select(scored)
    means = [(hand[(s, "a")] + hand[(s, "b")]) / 2 for s in range(3)]
    assert means[0] == pytest.approx(means[1]) and means[2] > means[0]
    assert picks["fedshare"]["setting"] == 2
    assert picks["fedshare"]["scores"] == pytest.approx(means)
    assert picks["fru"]["setting"] == 0  # a tie goes to the earlier entry; test never read


def test_a_term_a_plan_cannot_measure_counts_zero():
    rows = [_row("retrain", -1, "a", 0.2, 0.5), _row("no-unlearning", -1, "a", 0.1, 0.5),
            _row("cufru", 0, "a", 0.1, 0.4)]
    scored = score_frame(pd.DataFrame(rows))
    assert scored["score"].item() == pytest.approx(0.5)  # no canary excess: forgetting 0


def test_every_method_gets_the_same_budget():
    grids = load_grids()
    for budget in (1, 2, BUDGET):
        grid = candidates(grids, budget)
        assert sorted(grid) == sorted(TUNED)
        assert {len(g) for g in grid.values()} == {budget}
    assert candidates(grids, 1)["fedshare"] == [{"lr": 0.03, "weight": 0.1}]  # defaults first
    assert candidates(grids)["fru"][0] == {"epoch_fraction": 0.1}  # FRU's paper value first
    with pytest.raises(FedShareError, match="fewer than the budget"):
        candidates(grids, BUDGET + 1)
    with pytest.raises(FedShareError, match="no setting"):
        candidates({**grids, "fru": {"alpha": [0.1]}}, 1)
    with pytest.raises(FedShareError, match="bad cufru"):
        candidates({**grids, "cufru": {"interval": [0]}}, 1)


def test_plans_parse_and_clash():
    assert parse_plans("2:2, 3:4") == [(2, 2), (3, 4)]
    for bad in ("2", "a:b", "2:2,2:2", "-1:0"):
        with pytest.raises(FedShareError):
            parse_plans(bad)
    tuned = [{"dataset": "d", "split_seed": 5, "plan_seed": 6}]
    assert seed_clash({"dataset": "d", "split_seed": 1, "plan_seed": 2}, tuned) is None
    assert seed_clash({"dataset": "e", "split_seed": 5, "plan_seed": 6}, tuned) is None
    assert "split seed" in seed_clash({"dataset": "d", "split_seed": 5, "plan_seed": 2}, tuned)
    assert "plan seed" in seed_clash({"dataset": "d", "split_seed": 1, "plan_seed": 6}, tuned)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A tiny dataset, and one tuning run on its plan 5:5 at budget 2."""
    root = tmp_path_factory.mktemp("tuning")
    folder = tiny_prepared(num_users=30, num_items=60, unshare_user_fraction=0.5).save(
        root / "tiny")
    out, chosen = tune_unlearning([(5, 5)], sets=[f"prepared={folder}", *TINY], budget=2,
                                  grids=TINY_GRIDS, canaries=2, out=root / "runs",
                                  progress=lambda line: None)
    return root, folder, out, chosen


def test_tuning_writes_every_candidate_and_the_chosen_settings(tuned):
    _, _, out, chosen = tuned
    frame = pd.read_csv(out / "tuning.csv")
    counts = frame[frame["setting"] >= 0].groupby("method").size()
    assert dict(counts) == dict.fromkeys(TUNED, 2)  # the same budget for every method
    assert set(frame["method"]) == set(METHODS) and set(frame["plan"]) == {"5:5"}
    scored = score_frame(frame.drop(columns=["utility", "forgetting", "score"]))
    assert frame.loc[scored.index, "score"].tolist() == pytest.approx(scored["score"].tolist())
    picks = select(scored)
    on_disk = json.loads((out / "chosen.json").read_text())
    assert on_disk == chosen and on_disk["budget"] == 2
    for method in TUNED:
        entry = on_disk["methods"][method]
        assert entry["grid"] == candidates(TINY_GRIDS, 2)[method]
        assert entry["settings"] == entry["grid"][picks[method]["setting"]]
        assert [(p["split_seed"], p["plan_seed"]) for p in entry["tuning_plans"]] == [(5, 5)]
        assert entry["tuning_plans"][0]["dataset"] == "synthetic"
    assert load_chosen(out / "chosen.json").settings["fru"] == on_disk["methods"]["fru"][
        "settings"]


def test_the_table_reports_on_fresh_plans_at_the_chosen_settings(tuned, monkeypatch):
    root, folder, tune_out, _ = tuned
    path = tune_out / "chosen.json"
    chosen = json.loads(path.read_text())
    # settings nobody would pick, so a run at the defaults could not pass for them
    chosen["methods"]["fedshare"]["settings"] = {"lr": 0.07, "rounds": 1}
    chosen["methods"]["cufru"]["settings"] = {"interval": 2, "epoch_fraction": 0.5}
    path = root / "edited.json"
    path.write_text(json.dumps(chosen))
    used = []
    real = table_module.unlearn

    def spy(learned, data, method, config, round_offset, replay=None):
        used.append((method, config, replay))
        return real(learned, data, method, config, round_offset, replay)

    monkeypatch.setattr(table_module, "unlearn", spy)
    out, stats, _ = table_module.unlearning_table(
        (0,), [f"prepared={folder}", *TINY], canaries=2, out=root / "tables",
        progress=lambda line: None, plans=[(7, 7), (8, 8)], settings=load_chosen(path))
    frame = pd.read_csv(out / "unlearning_table.csv")
    assert set(frame["plan"]) == {"7:7", "8:8"} and len(frame) == 2 * len(METHODS)
    summary = json.loads((out / "summary.json").read_text())
    reported = [(p["split_seed"], p["plan_seed"]) for p in summary["reported_plans"]]
    tuning = {(p["split_seed"], p["plan_seed"]) for m in TUNED
              for p in summary["tuning_plans"][m]}
    assert reported == [(7, 7), (8, 8)] and tuning == {(5, 5)}
    assert "learning" in summary["tuning_plans"] and not summary["reported_on_a_tuning_plan"]
    assert summary["settings"]["fedshare"]["unlearning"]["lr"] == 0.07
    assert summary["settings"]["cufru"]["replay"]["interval"] == 2
    runs = {m: [(c, r) for mm, c, r in used if mm == m] for m in METHODS}
    assert all(len(v) == 2 for v in runs.values())
    assert all(c.lr == 0.07 and c.rounds == 1 for c, _ in runs["fedshare"])
    assert all(r.interval == 2 and r.epoch_fraction == 0.5 for _, r in runs["cufru"])
    assert all(r.epoch_fraction == chosen["methods"]["fru"]["settings"]["epoch_fraction"]
               for _, r in runs["fru"])
    # mean over all (plan, seed) cells
    fed = frame[frame["method"] == "fedshare"]["test_hr@20"]
    assert stats.loc["fedshare", ("test_hr@20", "mean")] == pytest.approx(fed.mean())


def test_a_reported_plan_sharing_a_tuning_seed_is_refused(tuned, capsys):
    root, folder, tune_out, _ = tuned
    out = root / "refused"
    for plans in ("7:7,5:9", "9:5"):
        code = main(["unlearning-table", "--settings", str(tune_out / "chosen.json"), "--plans",
                     plans, "--seeds", "0", "--set", f"prepared={folder}", "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "disjoint" in err
    code = main(["unlearning-table", "--settings", str(tune_out / "chosen.json"), "--plans",
                 "7:7", "--unlearn-lr", "0.1", "--set", f"prepared={folder}", "--out", str(out)])
    assert code == 2 and "--unlearn-*" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("edit", [
    lambda c: c.pop("methods"),
    lambda c: c["methods"].pop("cufru"),
    lambda c: c["methods"]["fru"].update(settings={"alpha": 0.5}),
    lambda c: c["methods"]["fedshare"].update(settings={"lr": -1.0}),
    lambda c: c["methods"]["fedshare"].update(tuning_plans=[]),
    lambda c: c["methods"]["fedshare"].update(tuning_plans=[{"dataset": "x"}]),
    lambda c: c.update(format=99),
])
def test_a_malformed_chosen_json_is_refused(tuned, edit, capsys):
    root, folder, tune_out, _ = tuned
    chosen = json.loads((tune_out / "chosen.json").read_text())
    edit(chosen)
    path = root / "bad.json"
    path.write_text(json.dumps(chosen))
    with pytest.raises(FedShareError, match=r"not a chosen\.json"):
        load_chosen(path)
    out = root / "refused-bad"
    code = main(["unlearning-table", "--settings", str(path), "--plans", "7:7", "--seeds", "0",
                 "--set", f"prepared={folder}", "--out", str(out)])
    assert code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not out.exists()


def test_fresh_plans_of_a_prepared_folder(tuned):
    from simulations.plans import fresh_plan

    _, folder, _, _ = tuned
    run = {"prepared": str(folder)}
    a, b = fresh_plan(run, 3, 4), fresh_plan(run, 3, 4, (0.2, 0.3, 0.5), 0.5)
    assert plan_of(a)["fingerprint"] == plan_of(fresh_plan(run, 3, 4))["fingerprint"]
    assert plan_of(a)["fingerprint"] != plan_of(fresh_plan(run, 4, 4))["fingerprint"]
    assert plan_of(b)["groups"] == [0.2, 0.3, 0.5] and plan_of(b)["gamma"] == 0.5
    assert plan_of(a)["groups"] == [0.25, 0.25, 0.5]  # the folder's own plan shape
    assert len(a.split.train) + len(a.split.valid) + len(a.split.test) == sum(
        len(p) for p in (b.split.train, b.split.valid, b.split.test))


def test_groups_without_plans_and_seeds_beside_plans_are_refused(tuned):
    _, folder, _, _ = tuned
    with pytest.raises(FedShareError, match="--groups"):
        table_module.reported_data([f"prepared={folder}"], groups=(0.2, 0.3, 0.5))
    with pytest.raises(FedShareError, match="split-seed"):
        table_module.reported_data([f"prepared={folder}", "split-seed=3"], plans=[(1, 1)])
    with pytest.raises(FedShareError, match="seed"):
        tune_unlearning([(1, 1)], sets=[f"prepared={folder}", "seed=3"])
    with pytest.raises(FedShareError, match="canar"):
        tune_unlearning([(1, 1)], canaries=0)
    assert UnlearningConfig().lr == 0.03  # the grids' first entries are these defaults
