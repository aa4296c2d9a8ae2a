"""The ``fedshare-reset`` variant: forgotten items left with no edge in the updated G_s start
the phase from their initial rows (regenerated from the seed), every other row as learned."""

from __future__ import annotations

import numpy as np
import torch
from synthetic import tiny_prepared

from fedshare.data.interactions import Interactions
from fedshare.federated.config import FederatedConfig
from fedshare.federated.server import Server
from fedshare.unlearning.algorithm import reset_orphans
from fedshare.unlearning.config import VARIANTS, UnlearningConfig
from fedshare.unlearning.phase import METHODS, learn, unlearn

CONFIG = FederatedConfig(rounds=2, fraction=0.5, dim=8, server_steps=2, seed=3, snapshots=2,
                         eval_every=2)


def test_the_initial_table_is_regenerated_from_the_seed():
    shared = Interactions.from_arrays(np.array([0, 1]), np.array([2, 3]), 4, 6)
    server = Server(shared, CONFIG)
    first = server.table.clone()
    server.table = torch.zeros_like(first)
    assert torch.equal(server.initial_table(), first)


def test_only_orphaned_forgotten_items_are_reset():
    # G_s after unsharing: items 2 and 3 keep edges; items 3, 4, 5 were forgotten
    remaining = Interactions.from_arrays(np.array([0, 1]), np.array([2, 3]), 4, 6)
    server = Server(remaining, CONFIG)
    learned = torch.randn(6, 8)
    server.table = learned.clone()
    reset = reset_orphans(server, np.array([3, 4, 5, 5]))
    assert reset.tolist() == [4, 5]  # item 3 still has an edge in G_s
    initial = server.initial_table()
    assert torch.equal(server.table[[4, 5]], initial[[4, 5]])
    assert torch.equal(server.table[[0, 1, 2, 3]], learned[[0, 1, 2, 3]])
    assert torch.equal(server.item.detach(), server.table)


def test_the_variant_is_a_named_method_beside_the_faithful_one():
    assert VARIANTS["fedshare"] == {} and VARIANTS["fedshare-reset"] == {"reset_orphans": True}
    assert {"fedshare", "fedshare-reset"} <= set(METHODS)
    assert not UnlearningConfig().reset_orphans  # the faithful default
    torch.set_num_threads(1)
    data = tiny_prepared()
    federation = learn(data, CONFIG)
    faithful = unlearn(federation, data, "fedshare", UnlearningConfig(rounds=1, steps=1), 2)
    variant = unlearn(federation, data, "fedshare-reset", UnlearningConfig(rounds=1, steps=1), 2)
    assert not torch.equal(faithful.federation.server.table, variant.federation.server.table)
    assert variant.kept_bytes == faithful.kept_bytes  # no storage beyond the M snapshots
