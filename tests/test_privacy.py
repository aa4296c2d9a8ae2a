"""The privacy audit (issue 20): the attacks find planted local items in an undefended upload (so
the audit can fail), the defences do what their formulas say, and the audit's plumbing is sound.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from synthetic import tiny_prepared

from fedshare.defences import (
    UploadDefence,
    defend_upload,
    device_generator,
    ldp_epsilon,
    parse_defences,
    self_sampled,
)
from fedshare.errors import FedShareError
from fedshare.federated.config import FederatedConfig
from fedshare.federated.inprocess import InProcessFederation, run_inprocess
from fedshare.federated.population import ClientPopulation
from fedshare.models.local import LocalTrainConfig
from fedshare.privacy.attacks import (
    LearnedAttack,
    correlation,
    disaggregation,
    features,
    single_scores,
)
from fedshare.privacy.audit import AuditSetting, audit_setting, training_key
from fedshare.privacy.observations import single_replies
from fedshare.privacy.scoring import auc, matched_negatives, popularity_bins, score_user

LOCAL = LocalTrainConfig(epochs=5, lr=0.5)


def _replies(data, users, defence=None, seed=0):
    population = ClientPopulation(data, np.arange(data.num_users), 8, seed, local=LOCAL)
    table = torch.nn.init.xavier_uniform_(torch.empty(data.num_items, 8),
                                          generator=torch.Generator().manual_seed(1))
    local, held = population.user_items(users)
    replies, _ = single_replies(users, local, held, population.embeddings[users], table, LOCAL,
                                seed, 3, defence)
    return population, table, replies, local


# ----------------------------------------------------------------------------- scoring
def test_auc_known_answers() -> None:
    assert auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert auc(np.array([1.0]), np.array([2.0])) == 0.0
    assert auc(np.array([1.0, 3.0]), np.array([2.0])) == 0.5
    assert auc(np.array([1.0]), np.array([1.0, 1.0])) == 0.5  # ties count 1/2


def test_precision_counts_a_straddling_tie_at_its_share() -> None:
    scores = np.array([5.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    # local: items 0 and 1; negatives: 2 and 3 (tied with 1 at the cut)
    out = score_user(scores, np.array([0, 1]), np.array([2, 3]), np.array([0, 1]))
    assert out["precision"] == pytest.approx((1 + 1 / 3) / 2)
    assert out["auc"] == pytest.approx((1 + 1 + 0.5 + 0.5) / 4)


def test_matched_negatives_share_the_popularity_bin_and_are_never_interacted() -> None:
    rng = np.random.default_rng(0)
    popularity = rng.integers(0, 100, 500)
    bins = popularity_bins(popularity, 10)
    assert np.bincount(bins).tolist() == [50] * 10
    local = rng.choice(500, 20, replace=False)
    interacted = np.concatenate([local, rng.choice(500, 30)])
    negatives = matched_negatives(local, interacted, bins, rng)
    assert (bins[negatives] == bins[local]).all()
    assert not np.isin(negatives, interacted).any()


# ----------------------------------------------------------------------------- observations
def test_single_replies_equal_one_user_nodes_replies() -> None:
    """The audit's vectorised replies are what a one-user node of the app sends."""
    data = tiny_prepared(num_users=12, num_items=60)
    for defence in (None, UploadDefence(("non-marking",), decoy_rows=30)):
        population, table, replies, _ = _replies(data, np.arange(12), defence)
        for user in population.trainable()[:5].tolist():  # replies are in user order
            node = ClientPopulation(data, np.array([user]), 8, 0, local=LOCAL)
            update = node.train(np.array([user]), table, LOCAL, 0, 3, defence=defence)
            torch.testing.assert_close(update.weight * (update.table - table),
                                       replies.delta[user], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(update.row_weight, replies.row_weight[user])


# ----------------------------------------------------------------------------- attacks
def test_each_attack_recovers_planted_local_items_from_an_undefended_upload() -> None:
    data = tiny_prepared(num_users=40, num_items=200, seed=3)
    population, _, replies, local = _replies(data, np.arange(40))
    popularity = np.bincount(data.split.train.items, minlength=data.num_items)
    rng = np.random.default_rng(0)
    bins = popularity_bins(popularity, 10)
    results: dict[str, list[float]] = {}
    users = population.trainable()
    for user in users.tolist():
        delta, weight = replies.observe(np.array([user]))
        mine = local[user]
        negatives = matched_negatives(mine, population.user_items([user])[1][0], bins, rng)
        for attack, score in single_scores(delta, weight, popularity).items():
            results.setdefault(attack, []).append(
                score_user(score.numpy(), mine, negatives, mine)["auc"])
    means = {a: float(np.mean(v)) for a, v in results.items()}
    assert means["touched"] > 0.8, means
    assert means["row-weight"] > 0.8, means
    assert means["delta-norm"] > 0.8, means
    assert means["projection"] > 0.9, means


def test_learned_attack_learns_a_planted_feature() -> None:
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(400, 3))).float()
    y = (x[:, 1] > 0.2).float()
    attack = LearnedAttack(x, y)
    assert auc(attack(x)[y == 1].numpy(), attack(x)[y == 0].numpy()) > 0.98


def test_features_are_finite_on_an_empty_upload() -> None:
    f = features(torch.zeros(10, 4), torch.zeros(10), np.linspace(0, 1, 10), np.arange(10))
    assert torch.isfinite(f).all()


def test_disaggregation_isolates_a_consistent_contribution() -> None:
    """Round sums: the target adds weight 5 to rows 0-2 in the rounds it takes part in; the
    others add noise; the difference of means ranks rows 0-2 first."""
    rng = np.random.default_rng(0)
    rounds, items = 60, 30
    took = rng.random(rounds) < 0.3
    weights = torch.from_numpy(rng.poisson(20, (rounds, items))).float()
    weights[torch.from_numpy(took), :3] += 5
    deltas = torch.from_numpy(rng.normal(size=(rounds, items, 4))).float()
    deltas[torch.from_numpy(took), :3] += 2.0
    scores = disaggregation(weights, deltas, took)
    for score in scores.values():
        assert set(torch.topk(score, 3).indices.tolist()) == {0, 1, 2}
    none = disaggregation(weights, deltas, np.zeros(rounds, bool))
    assert all((s == 0).all() for s in none.values())


def test_correlation_finds_a_heavy_contribution_without_participation() -> None:
    """Hidden participation: the target's weight 50 lifts the round total and rows 0-2 in
    the rounds it trains; the covariance with the total ranks those rows first."""
    rng = np.random.default_rng(1)
    rounds, items = 200, 30
    took = torch.from_numpy(rng.random(rounds) < 0.3)
    weights = torch.from_numpy(rng.poisson(20, (rounds, items))).float()
    weights[took, :3] += 50
    totals = torch.from_numpy(rng.normal(1000, 5, rounds)).float() + 50 * took
    deltas = torch.from_numpy(rng.normal(size=(rounds, items, 4))).float()
    deltas[took, :3] *= 4
    for score in correlation(weights, deltas, totals).values():
        assert set(torch.topk(score, 3).indices.tolist()) == {0, 1, 2}


# ----------------------------------------------------------------------------- defences
def test_parse_defences() -> None:
    assert parse_defences("none") == ()
    assert parse_defences("") == ()
    assert parse_defences("secagg+hidden") == ("secagg", "hidden")
    for bad in ("secagg+magic", "secagg+secagg", "ldp+non-marking"):
        with pytest.raises(FedShareError):
            parse_defences(bad)
    with pytest.raises(FedShareError):
        UploadDefence(("ldp",), ldp_clip=0.0)


def test_ldp_clips_to_the_norm_and_adds_noise_of_the_stated_scale() -> None:
    items = torch.tensor([1, 5, 7])
    deltas = torch.full((3, 4), 2.0)  # norm sqrt(48) > 1
    clipped_only = UploadDefence(("ldp",), ldp_clip=1.0, ldp_noise=0.0)
    rows, values = defend_upload(items, deltas, 20, clipped_only, device_generator(0, 1, 2))
    assert rows.tolist() == list(range(20))  # every row: nothing marks the touched ones
    assert float(values.norm()) == pytest.approx(1.0)
    small = torch.full((3, 4), 0.01)
    _, kept = defend_upload(items, small, 20, clipped_only, device_generator(0, 1, 2))
    torch.testing.assert_close(kept[items], small)
    # noise: std = ldp_noise * 2 * clip (sensitivity 2C); 2,000 x 32 draws: the sample std
    # is within 2% of it with overwhelming probability (its relative sd is about 0.4%)
    noisy = UploadDefence(("ldp",), ldp_clip=0.5, ldp_noise=1.5)
    _, values = defend_upload(torch.zeros(0, dtype=torch.long), torch.zeros(0, 32), 2000, noisy,
                              device_generator(0, 1, 2))
    assert float(values.std()) == pytest.approx(1.5 * 2 * 0.5, rel=0.02)
    assert abs(float(values.mean())) < 0.05


def test_ldp_epsilon_is_the_minimum_of_its_renyi_bound() -> None:
    for z, r, delta in ((1.0, 10, 1e-5), (0.5, 1, 1e-6), (3.0, 40, 1e-5)):
        alphas = np.linspace(1.0001, 2000, 2_000_000)
        numeric = float(np.min(r * alphas / (2 * z**2) + math.log(1 / delta) / (alphas - 1)))
        assert ldp_epsilon(z, r, delta) == pytest.approx(numeric, rel=1e-4)
    assert ldp_epsilon(1.0, 0, 1e-5) == 0.0
    assert math.isinf(ldp_epsilon(0.0, 3, 1e-5))
    assert ldp_epsilon(2.0, 10, 1e-5) < ldp_epsilon(1.0, 10, 1e-5)


def test_non_marking_uploads_a_fixed_row_set_with_scaled_decoys() -> None:
    generator = device_generator(0, 1, 2)
    items = torch.tensor([3, 9, 11])
    deltas = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    full = UploadDefence(("non-marking",))
    rows, values = defend_upload(items, deltas, 500, full, generator)
    assert rows.tolist() == list(range(500))
    torch.testing.assert_close(values[items], deltas)
    decoys = values[~torch.isin(rows, items)]
    assert float(decoys.std()) == pytest.approx(float(deltas.std()), rel=0.05)
    some = UploadDefence(("non-marking",), decoy_rows=40)
    rows, _ = defend_upload(items, deltas, 500, some, device_generator(0, 1, 3))
    assert len(rows) == 40 and torch.isin(items, rows).all() and len(set(rows.tolist())) == 40
    assert (rows.diff() > 0).all()  # sorted: the order says nothing either


def test_self_sampling_is_per_device_and_at_the_fraction() -> None:
    users = np.arange(20_000)
    chosen = self_sampled(users, 0.1, 0, 7)
    assert abs(len(chosen) / len(users) - 0.1) < 0.01  # binomial sd 0.002
    part = users[::3]
    assert np.array_equal(self_sampled(part, 0.1, 0, 7), np.intersect1d(chosen, part))
    assert not np.array_equal(self_sampled(users, 0.1, 0, 8), chosen)


def test_defended_training_changes_the_aggregate_and_hidden_training_runs() -> None:
    data = tiny_prepared(num_users=20, num_items=60)
    config = FederatedConfig(rounds=2, fraction=0.5, dim=8, eval_every=1, server_steps=1)
    plain = run_inprocess(data, config, validate=False).table
    marked = run_inprocess(data, config, validate=False,
                           defence=UploadDefence(("non-marking",))).table
    assert not torch.allclose(plain, marked)
    hidden = InProcessFederation(data, config, defence=UploadDefence(("hidden",)))
    assert np.array_equal(hidden.round_users(1),
                          self_sampled(hidden.candidates, 0.5, config.seed, 1))


# ----------------------------------------------------------------------------- the audit
def test_audit_fails_an_undefended_device_and_passes_a_secure_sum() -> None:
    data = tiny_prepared(num_users=60, num_items=120, seed=1)
    config = FederatedConfig(rounds=4, fraction=0.5, dim=8, eval_every=2, server_steps=1)
    device = audit_setting(data, config, AuditSetting("device", UploadDefence(), 1), users=15)
    secure = audit_setting(data, config, AuditSetting(
        "secagg", UploadDefence(("secagg",)), 0), users=15)
    d = device.scores.groupby("attack")["auc"].mean()
    s = secure.scores.groupby("attack")["auc"].mean()
    assert (d[["touched", "row-weight", "delta-norm", "projection", "learned"]] > 0.8).all(), d
    assert d["learned"] > 0.95, d  # trained on the server's simulated shared users
    assert {"disaggregation-weight", "disaggregation-delta"} <= set(s.index)
    hidden = audit_setting(data, config, AuditSetting(
        "secagg+hidden", UploadDefence(("secagg", "hidden")), 0), users=15)
    assert {"correlation-weight", "correlation-delta"} <= set(hidden.scores["attack"])
    assert s[["touched", "row-weight", "delta-norm", "projection"]].max() < d.max()
    assert device.utility["test-hr@20"] == secure.utility["test-hr@20"]  # same training
    assert training_key(UploadDefence(("secagg",))) == training_key(UploadDefence())
    assert training_key(UploadDefence(("ldp",))) != training_key(UploadDefence())


# ----------------------------------------------------------------------------- device secret
def test_a_device_secret_changes_every_private_draw_and_zero_keeps_the_seed_streams() -> None:
    """The server knows the run seed; with a device secret it cannot recompute the draws."""
    from fedshare.federated.pdc import perturb_user

    users = np.arange(5000)
    assert np.array_equal(self_sampled(users, 0.1, 0, 3, secret=0), self_sampled(users, 0.1, 0, 3))
    assert not np.array_equal(self_sampled(users, 0.1, 0, 3, secret=12345),
                              self_sampled(users, 0.1, 0, 3))
    plain = torch.randn(8, generator=device_generator(0, 1, 2))
    torch.testing.assert_close(torch.randn(8, generator=device_generator(0, 1, 2, 0)), plain)
    assert not torch.equal(torch.randn(8, generator=device_generator(0, 1, 2, 99)), plain)
    shared, held = np.array([10, 20, 30]), np.array([10, 20, 30, 40])
    public = perturb_user(1, shared, held, 200, 1.0, 0)
    private = perturb_user(1, shared, held, 200, 1.0, 0, secret=777)
    assert not np.array_equal(public, private)
    assert not np.isin(private, held).any() and len(set(private.tolist())) == 3


def test_a_deployed_device_keeps_its_secret_and_a_simulated_node_has_none(tmp_path) -> None:
    from flwr.app import Context, RecordDict

    from clients.app import device_secret

    assert device_secret(Context(1, 1, {"partition-id": 0, "num-partitions": 1}, RecordDict(),
                                 {})) == 0
    from fedshare.data.device import write_device_files

    files = write_device_files(tiny_prepared(), np.array([3, 7]), tmp_path / "devices")
    node = {"device-file": str(files[0]), "state-dir": str(tmp_path / "state")}
    first = device_secret(Context(1, 1, node, RecordDict(), {}))
    assert first != 0
    again = device_secret(Context(2, 1, node, RecordDict(), {}))  # a new run, same device
    assert again == first
    other = {"device-file": str(files[1]), "state-dir": str(tmp_path / "state")}
    assert device_secret(Context(1, 2, other, RecordDict(), {})) != first
