"""Unlearning has an effect: on a small fixture where the learned model memorised its canaries
(three items shared, then unshared, by every unsharing user), FedShare's unlearning brings their
exposure well below the no-unlearning model's and removes most of its excess over Retrain's,
the model that never saw them. Figures of this fixture (seed 0): no-unlearning 0.813, FedShare
0.446, Retrain 0.359."""

from __future__ import annotations

import pytest
import torch
from synthetic import tiny_prepared

from fedshare.federated.config import FederatedConfig
from fedshare.unlearning import phase
from fedshare.unlearning.config import UnlearningConfig
from fedshare.unlearning.remaining import add_canaries
from fedshare.unlearning.report import unlearning_row

MARGIN = 0.2  # FedShare's canary exposure lies at least this far below no-unlearning's
REMOVED = 0.5  # and it removes at least this share of the excess over Retrain's


@pytest.fixture(scope="module")
def exposure():
    torch.set_num_threads(1)
    data = tiny_prepared(num_users=100, num_items=200, unshare_user_fraction=0.5)
    canary_data, canaries = add_canaries(data, 3, seed=0, common=True)
    config = FederatedConfig(rounds=60, eval_every=100, fraction=1.0, dim=16, server_steps=10,
                             local_epochs=2, seed=0)
    learned = phase.learn(canary_data, config)
    outcomes = {m: phase.unlearn(learned, canary_data, m, UnlearningConfig(rounds=20, steps=10),
                                 config.rounds) for m in ("no-unlearning", "fedshare", "retrain")}
    return {m: unlearning_row(o, canary_data, canaries, outcomes["retrain"])["canary_exposure"]
            for m, o in outcomes.items()}


def test_the_learned_model_memorised_the_canaries(exposure):
    assert exposure["no-unlearning"] > exposure["retrain"] + 2 * MARGIN  # the fixture works


def test_fedshare_unlearning_lowers_canary_exposure(exposure):
    assert exposure["fedshare"] < exposure["no-unlearning"] - MARGIN
    excess = exposure["no-unlearning"] - exposure["retrain"]
    assert (exposure["no-unlearning"] - exposure["fedshare"]) / excess > REMOVED
