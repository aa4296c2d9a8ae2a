"""PDC-FRS (variant ``pdc-frs``, :mod:`fedshare.federated.pdc`): the exponential mechanism on the
device, the auxiliary refinement on the server, augmented local training, both engines, the
message audit of a Flower run, bad settings and the epsilon sweep.

One Flower simulation (about 30 s) is shared by the tests that need it: 2 SuperNodes serving
cohorts, with a message audit, beside the in-process engine with the same settings.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import pytest
import torch
from synthetic import tiny_prepared
from test_flower_app import _audit, _superlinks, assert_superlinks_gone

from fedshare.data.interactions import Interactions
from fedshare.data.prepared import PreparedData
from fedshare.errors import FedShareError
from fedshare.federated.config import FederatedConfig
from fedshare.federated.inprocess import run_inprocess
from fedshare.federated.pdc import (
    PdcSettings,
    perturb_shared,
    perturb_user,
    probabilities,
    similarity,
    user_epsilon,
)
from fedshare.federated.population import ClientPopulation
from fedshare.federated.rounds import sample_users
from fedshare.federated.server import Server
from fedshare.runconfig import unlearning_config
from simulations import pdc_sweep
from simulations.cli import main
from simulations.experiment import resolve, run_experiment

NUM_USERS, NUM_ITEMS, DIM, SEED, ROUNDS, FRACTION = 10, 40, 8, 0, 2, 0.5
EPS, AUGMENT = 3.0, 3
CHI2_9_DOF_999 = 27.877
"""The 0.999 quantile of the chi-square distribution with 9 degrees of freedom."""


@pytest.fixture(scope="module")
def data() -> PreparedData:
    return tiny_prepared()


def _population(data: PreparedData, users: np.ndarray, eps: float = EPS,
                augment: int = AUGMENT) -> ClientPopulation:
    return ClientPopulation(data, users, DIM, SEED, pdc=PdcSettings(eps, augment))


def _pairs(users: np.ndarray, items: np.ndarray) -> set[tuple[int, int]]:
    return set(zip(users.tolist(), items.tolist(), strict=True))


def _train_pairs(data: PreparedData) -> set[tuple[int, int]]:
    train = data.split.train
    return _pairs(train.users, train.items)


# ------------------------------------------------------------------- the mechanism
def test_probabilities_follow_the_formula_and_bound_the_odds_by_e_eps():
    n, eps, excluded = 12, 1.5, np.array([0, 5])
    for item in range(n):
        p = probabilities(item, excluded, n, eps)
        weights = np.array([0.0 if j in excluded else
                            math.exp(eps * (1 - math.log(1 + abs(item - j)) / math.log(n)) / 2)
                            for j in range(n)])
        np.testing.assert_allclose(p, weights / weights.sum(), rtol=1e-12)
    sims = similarity(3, np.arange(n), n)
    assert sims.max() == 1.0 and sims.min() >= 0.0 and sims[3] == 1.0  # Delta = 1
    assert similarity(0, np.array([n - 1]), n)[0] == pytest.approx(0.0, abs=1e-12)
    # eps-LDP for a fixed candidate set: any output's odds between any two inputs <= e^eps
    table = np.stack([probabilities(i, excluded, n, eps) for i in range(n)])
    out = table[:, table[0] > 0]
    ratio = out[:, None, :] / out[None, :, :]
    assert ratio.max() <= math.exp(eps) * (1 + 1e-12)
    assert ratio.max() > 1.5  # inputs do change the odds


@pytest.mark.parametrize("eps", [0.5, 8.0])
def test_empirical_frequencies_match_the_mechanism(eps):
    """20,000 independent draws (users 0..N-1 on one stream, each holding items 2 and 7 and
    sharing 7) against P(j | 7): a chi-square statistic over the 10 candidates, 9 degrees of
    freedom, below its 0.999 quantile (the draws are fixed by the seed, so the test is
    deterministic; a correct sampler fails it for 0.1% of seeds)."""
    n, item, held, draws = 12, 7, np.array([2, 7]), 20_000
    users = np.arange(draws)
    reported = perturb_shared(users, np.full(draws, item), np.arange(0, 2 * draws + 1, 2),
                              np.tile(held, draws), n, eps, seed=SEED)
    counts = np.bincount(reported, minlength=n)
    assert counts[held].sum() == 0
    expected = draws * probabilities(item, held, n, eps)
    candidates = expected > 0
    assert candidates.sum() == 10
    chi2 = float(((counts[candidates] - expected[candidates]) ** 2
                  / expected[candidates]).sum())
    assert chi2 < CHI2_9_DOF_999, (chi2, counts, expected.round())


def test_draws_are_distinct_reproducible_and_keyed_by_user_and_item():
    n, held = 30, np.array([1, 4, 9, 16, 25])
    shared = np.array([16, 4, 25])
    first = perturb_user(7, shared, held, n, 2.0, SEED)
    assert np.array_equal(first, perturb_user(7, shared, held, n, 2.0, SEED))
    assert len(set(first.tolist())) == 3 and not np.isin(first, held).any()
    # the same draws whatever order the shared items come in
    order = np.array([2, 0, 1])
    assert np.array_equal(perturb_user(7, shared[order], held, n, 2.0, SEED), first[order])
    seeds = {tuple(perturb_user(7, shared, held, n, 2.0, s).tolist()) for s in range(5)}
    assert len(seeds) > 1  # the seed keys the stream
    # a catalogue the user holds whole leaves nothing to report
    with pytest.raises(FedShareError, match="whole catalogue"):
        perturb_user(0, np.array([0]), np.arange(4), 4, 1.0, SEED)


def test_a_large_epsilon_reports_a_catalogue_neighbour():
    n, held = 50, np.array([20])
    reports = [perturb_user(u, held, held, n, 200.0, SEED)[0] for u in range(50)]
    assert set(reports) <= {19, 21}


def test_user_epsilon_composes():
    assert user_epsilon(0.5, 8) == 4.0 and user_epsilon(1.0, 0) == 0.0


# ------------------------------------------------------------- on the device
def test_reports_never_hold_the_users_items_and_do_not_depend_on_the_cohort(data):
    whole = _population(data, np.arange(NUM_USERS))
    users, items = whole.shared_interactions()
    shared = data.plan.shared_data(data.split.train)
    assert len(users) == len(shared) == int(data.plan.shared.sum())
    assert np.array_equal(np.sort(users), np.sort(shared.users))
    reported = _pairs(users, items)
    assert len(reported) == len(users)  # no pair twice
    assert reported.isdisjoint(_train_pairs(data))  # neither a shared nor a local item
    again = _population(data, np.arange(NUM_USERS)).shared_interactions()
    assert _pairs(*again) == reported
    for parts in (3, NUM_USERS):
        union = set()
        for part in np.array_split(np.arange(NUM_USERS), parts):
            union |= _pairs(*_population(data, part).shared_interactions())
        assert union == reported
    other = _population(data, np.arange(NUM_USERS), eps=0.1).shared_interactions()
    assert _pairs(*other) != reported
    plain = ClientPopulation(data, np.arange(NUM_USERS), DIM, SEED).shared_interactions()
    assert _pairs(*plain) == _pairs(shared.users, shared.items)  # other variants: unchanged


def test_augmented_positives_are_unheld_top_items_in_any_cohort(data):
    table = torch.randn(NUM_ITEMS, DIM, generator=torch.Generator().manual_seed(3))
    whole = _population(data, np.arange(NUM_USERS))
    users = whole.trainable()
    extra = whole.augmented(users, table, AUGMENT)
    history = data.split.train.items_by_user()
    for user, items in zip(users.tolist(), extra, strict=True):
        held = history[1][history[0][user]:history[0][user + 1]]
        assert len(items) == AUGMENT and not np.isin(items, held).any()
    alone = [_population(data, np.array([u])).augmented(np.array([u]), table, AUGMENT)[0]
             for u in users]
    assert all(np.array_equal(a, b) for a, b in zip(alone, extra, strict=True))
    # they are what the user's ranking puts first among items it does not hold
    scores = whole.scorer(table, users)(torch.from_numpy(users))
    for b, items in enumerate(extra):
        best = scores[b].clone()
        held = history[1][history[0][users[b]]:history[0][users[b] + 1]]
        best[held] = -math.inf
        assert set(items.tolist()) == set(torch.topk(best, AUGMENT).indices.tolist())


def test_training_adds_the_augmented_items_but_weighs_only_local_data(data):
    table = torch.randn(NUM_ITEMS, DIM, generator=torch.Generator().manual_seed(4))
    config = FederatedConfig(variant="pdc-frs", local_epochs=1, dim=DIM)
    plain, augmented = (_population(data, np.arange(NUM_USERS), augment=k) for k in (0, 3))
    users = plain.trainable()
    a = plain.train(users, table, config.local, SEED, 1)
    b = augmented.train(users, table, config.local, SEED, 1)
    assert a.weight == b.weight == float(plain.local_count(users).sum())
    assert not torch.allclose(a.table, b.table)
    extra = augmented.augmented(users, table, 3)
    touched = torch.unique(torch.cat([torch.from_numpy(e) for e in extra]))
    assert (b.row_weight[touched] > 0).all()


# ---------------------------------------------------------------- on the server
@pytest.mark.parametrize("weight", [1.0, 0.25])
def test_the_auxiliary_model_is_the_wo_cl_refinement_on_the_reports_weighted(data, weight):
    """V_s = agg + weight * (wo-cl's refinement of agg on the reports - agg)."""
    population = _population(data, np.arange(NUM_USERS))
    reports = Interactions.from_arrays(*population.shared_interactions(), NUM_USERS, NUM_ITEMS)
    start = torch.randn(NUM_ITEMS, DIM, generator=torch.Generator().manual_seed(5))
    pdc = Server(reports, FederatedConfig(variant="pdc-frs", dim=DIM, server_steps=3,
                                          pdc_weight=weight))
    wo_cl = Server(reports, FederatedConfig(variant="wo-cl", dim=DIM, server_steps=3))
    assert pdc.refines and pdc.config.contrastive_weight == 0.0
    for round_ in (1, 2):  # the auxiliary model's own state (user rows, Adam) carries on
        refined = wo_cl.finish_round(start, round_)
        torch.testing.assert_close(pdc.finish_round(start, round_),
                                   start + weight * (refined - start), atol=1e-7, rtol=0)
    assert not torch.equal(refined, start)


def test_an_inprocess_run_trains_on_the_reports_and_scores(data):
    config = FederatedConfig(variant="pdc-frs", rounds=ROUNDS, eval_every=1, fraction=FRACTION,
                             dim=DIM, server_steps=2, local_epochs=1, pdc_epsilon=EPS,
                             pdc_augment=AUGMENT)
    result = run_inprocess(data, config)
    federation = result.federation
    assert federation is not None
    shared = federation.server.shared
    reported = _pairs(*_population(data, np.arange(NUM_USERS)).shared_interactions())
    assert _pairs(shared.users, shared.items) == reported
    assert reported.isdisjoint(_train_pairs(data))
    assert torch.isfinite(result.table).all()
    assert not torch.allclose(result.table, Server(shared, config).table)
    assert set(result.test) == {"hr@20", "recall@20", "ndcg@20"}
    assert all(0.0 <= v <= 1.0 for v in [*result.test.values(), *result.valid.values()])
    assert [row["round"] for row in result.history] == [1, 2]
    population = federation.population
    for row in result.rounds:  # weights stay |I_local| of the round's users
        users = sample_users(population.trainable(), FRACTION, SEED, row["round"])
        assert row["num-users"] == len(users)
        assert row["num-examples"] == float(population.local_count(users).sum())


# ---------------------------------------------------------------- bad settings
@pytest.mark.parametrize("value", [0, 0.0, -1.0, "abc", True, math.nan, math.inf, [1.0]])
def test_a_bad_epsilon_is_a_one_line_error(value):
    with pytest.raises(FedShareError, match="pdc-epsilon") as caught:
        FederatedConfig.from_mapping({"variant": "pdc-frs", "pdc-epsilon": value})
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("text", ["0", "-2", "abc", "nan", "inf", "true"])
def test_a_bad_epsilon_on_the_command_line(text, capsys):
    with pytest.raises(FedShareError, match="pdc-epsilon"):
        resolve(None, ["variant=pdc-frs", f"pdc-epsilon={text}"])
    assert main(["run", "--engine", "inprocess", "--set", "variant=pdc-frs", "--set",
                 f"pdc-epsilon={text}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedshare: error: ") and "pdc-epsilon" in err
    assert err.count("\n") == 1


def test_other_bad_pdc_settings():
    for mapping in ({"pdc-augment": -1}, {"pdc-augment": 1.5}, {"pdc-weight": -0.1},
                    {"pdc-weight": 1.5}, {"pdc-weight": True}, {"pdc-weight": "x"}):
        with pytest.raises(FedShareError, match=next(iter(mapping))):
            FederatedConfig.from_mapping(mapping)
    assert FederatedConfig.from_mapping({"pdc-epsilon": 2}).pdc_epsilon == 2.0
    assert FederatedConfig(variant="fedshare").pdc is None
    assert FederatedConfig(variant="pdc-frs").pdc == PdcSettings(1.0, 5, 0.01)
    with pytest.raises(FedShareError, match="no unlearning phase"):
        unlearning_config({"variant": "pdc-frs", "unlearn": True})


@pytest.mark.parametrize("args", [
    ["--eps", "0,1"], ["--eps", "1,x"], ["--eps", "-1"], ["--eps", "1,1"], ["--seeds", "a"],
    ["--set", "pdc-epsilon=2"], ["--set", "variant=fedshare"], ["--workers", "0"],
    ["--set", "rounds=0"], ["--references", "fedprox"], ["--references", "pdc-frs"]])
def test_bad_sweep_input_is_a_one_line_error(args, capsys, tmp_path):
    assert main(["pdc-sweep", *args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedshare: error: ") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # nothing written


# ---------------------------------------------------------------- the sweep
def test_the_sweep_writes_its_table_and_plot(data, tmp_path):
    folder = data.save(tmp_path / "tiny")
    sets = [f"prepared={folder}", "rounds=2", "eval-every=2", f"fraction={FRACTION}",
            f"dim={DIM}", "server-steps=2", "local-epochs=1"]
    out, stats = pdc_sweep.eps_sweep([0.5, 50.0], [0], sets, tmp_path / "runs", workers=1,
                                     progress=lambda line: None, references=("no-sharing",))
    rows = pd.read_csv(out / "pdc_sweep.csv")
    assert rows[["eps", "seed"]].values.tolist() == [[0.5, 0], [50.0, 0]]
    assert rows["test_hr@20"].between(0, 1).all() and rows["test_ndcg@20"].between(0, 1).all()
    # a large epsilon reports near neighbours far more often than a small one
    assert rows["neighbour_rate"].iloc[1] > rows["neighbour_rate"].iloc[0]
    assert rows["mean_similarity"].iloc[1] > rows["mean_similarity"].iloc[0]
    assert (out / "pdc_sweep.png").stat().st_size > 0
    assert list(stats.index) == [0.5, 50.0]
    assert "| 0.5 |" in (out / "pdc_sweep.md").read_text()
    references = pd.read_csv(out / "references.csv")
    assert references[["variant", "seed"]].values.tolist() == [["no-sharing", 0]]
    assert "| reference: no-sharing |" in (out / "pdc_sweep.md").read_text()
    # every run is the in-process run of its epsilon
    single = run_experiment(resolve(pdc_sweep.CONFIG, [*sets, "pdc-epsilon=0.5", "seed=0"]),
                            tmp_path / "single", "inprocess")[1]
    assert single["test"]["hr@20"] == pytest.approx(rows["test_hr@20"].iloc[0], abs=1e-9)


# ---------------------------------------------------------------- through Flower
@pytest.fixture(scope="module")
def flower_runs(tmp_path_factory, data):
    """PDC-FRS through Flower (2 cohort nodes, audited) and in process; no SuperLink of ours
    outlives them."""
    before = _superlinks()
    root = tmp_path_factory.mktemp("pdc-flower")
    folder = data.save(root / "tiny")
    audit = root / "audit"
    settings = [f"prepared={folder}", f"rounds={ROUNDS}", "eval-every=2",
                f"fraction={FRACTION}", f"dim={DIM}", "server-steps=2", "local-epochs=2",
                f"seed={SEED}", "defence=none", "variant=pdc-frs", f"pdc-epsilon={EPS}",
                f"pdc-augment={AUGMENT}"]  # plain replies: compared exactly, audited
    try:
        flower = resolve(None, [*settings, "num-supernodes=2", f"audit-dir={audit}"],
                         name="pdc-flower")
        inprocess = resolve(None, [*settings, "num-supernodes=2"], name="pdc-inprocess")
        started = time.perf_counter()
        results = {"flower": run_experiment(flower, root / "runs", "flower")}
        results["flower-seconds"] = time.perf_counter() - started
        results["inprocess"] = run_experiment(inprocess, root / "runs", "inprocess")
        yield {**results, "audit": audit}
    finally:
        assert_superlinks_gone(before)


def test_flower_equals_the_inprocess_engine(flower_runs):
    (out_f, flower), (out_i, inprocess) = flower_runs["flower"], flower_runs["inprocess"]
    assert flower["variant"] == inprocess["variant"] == "pdc-frs"
    np.testing.assert_allclose(np.load(out_f / "item_table.npy"),
                               np.load(out_i / "item_table.npy"), atol=1e-5, rtol=0)
    for part in ("valid", "test"):
        for key, value in flower[part].items():
            assert value == pytest.approx(inprocess[part][key], abs=1e-5), (part, key)
    assert flower["shared_interactions"] == inprocess["shared_interactions"]


def test_the_audit_shows_only_perturbed_items_reached_the_server(flower_runs, data):
    replies = _audit(flower_runs["audit"])
    share = [arrays for kind, _, _, arrays, _ in replies if kind == "share"]
    assert len(share) == 2
    users = np.concatenate([a["arrays/share-users"] for a in share])
    items = np.concatenate([a["arrays/share-items"] for a in share])
    uploaded = _pairs(users, items)
    assert len(uploaded) == len(users) == int(data.plan.shared.sum())
    train = data.split.train
    real_shared = _pairs(train.users[data.plan.shared], train.items[data.plan.shared])
    assert uploaded.isdisjoint(real_shared)  # no unperturbed shared pair
    assert uploaded.isdisjoint(_train_pairs(data))  # nor any local one
    expected = _population(data, np.arange(NUM_USERS)).shared_interactions()
    assert uploaded == _pairs(*expected)  # exactly the devices' reports, as in process
    local = np.bincount(train.users[~data.plan.shared], minlength=NUM_USERS)
    trained = [m for kind, _, _, _, m in replies if kind == "train"]
    assert trained and all(m["metrics/num-examples"] <= local.sum() for m in trained)
    integer = {k for *_, arrays, _ in replies for k, v in arrays.items()
               if np.issubdtype(v.dtype, np.integer)}
    assert integer == {"arrays/served-users", "arrays/local-counts", "arrays/share-users",
                       "arrays/share-items"}  # item ids reach the server only in share replies
