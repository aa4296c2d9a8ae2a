"""Client-side ego-graph LightGCN training: batching is exact, updates follow the formulas."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedshare.errors import FedShareError
from fedshare.models.embeddings import xavier_table
from fedshare.models.local import (
    LocalTrainConfig,
    LocalUpdate,
    UserBatch,
    train_local,
    user_representation,
)

NUM_USERS, NUM_ITEMS, DIM = 30, 60, 8
EMPTY_USER = 4  # has no training item


def _dataset(seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per user: training items, and every known item (training plus some held-out ones)."""
    rng = np.random.default_rng(seed)
    train, known = [], []
    for u in range(NUM_USERS):
        perm = rng.permutation(NUM_ITEMS)
        n_train = 0 if u == EMPTY_USER else int(rng.integers(1, 9))
        n_extra = int(rng.integers(0, 30)) if u % 3 == 0 else int(rng.integers(0, 4))
        train.append(np.sort(perm[:n_train]))
        known.append(np.sort(perm[:n_train + n_extra]))
    return train, known


def _start(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return xavier_table(NUM_ITEMS, DIM, gen), xavier_table(NUM_USERS, DIM, gen)


def _batch(users, train, known) -> UserBatch:
    return UserBatch.from_lists(list(users), [train[u] for u in users], [known[u] for u in users],
                                NUM_ITEMS)


CONFIGS = {
    "full-batch": LocalTrainConfig(epochs=2, lr=0.5, reg=1e-3, num_negatives=1),
    "mini-batch": LocalTrainConfig(epochs=3, lr=0.5, reg=1e-3, num_negatives=2, batch_size=3),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batched_training_equals_one_user_at_a_time(name):
    config = CONFIGS[name]
    train, known = _dataset()
    table, all_users = _start()
    order = np.random.default_rng(1).permutation(NUM_USERS)  # batch order != id order
    user_emb = all_users[torch.from_numpy(order)]

    batched = train_local(_batch(order, train, known), table, user_emb, config, seed=7,
                          round_=3)
    assert batched.users.tolist() == order.tolist()
    assert batched.user_embeddings.shape == (NUM_USERS, DIM)

    for b, u in enumerate(order):
        alone = train_local(_batch([u], train, known), table, user_emb[b:b + 1], config,
                            seed=7, round_=3)
        # bit for bit: a user's floats do not depend on its batch or where its rows lie
        assert torch.equal(batched.user_embeddings[b], alone.user_embeddings[0])
        assert torch.equal(batched.item_table(b, table), alone.item_table(0, table))
        mine = batched.row_user == b
        assert sorted(batched.row_item[mine].tolist()) == sorted(alone.row_item.tolist())
        if u == EMPTY_USER:
            assert torch.equal(batched.user_embeddings[b], user_emb[b])
            assert torch.equal(batched.item_table(b, table), table)
            assert not mine.any()
            assert torch.equal(alone.user_embeddings[0], user_emb[b])
            assert len(alone.row_item) == 0
        else:
            assert not torch.equal(batched.user_embeddings[b], user_emb[b])


def test_inputs_are_not_modified_and_results_are_deterministic():
    train, known = _dataset()
    table, user_emb = _start()
    table0, user0 = table.clone(), user_emb.clone()
    batch = _batch(range(NUM_USERS), train, known)
    config = CONFIGS["mini-batch"]
    first = train_local(batch, table, user_emb, config, seed=1, round_=0)
    second = train_local(batch, table, user_emb, config, seed=1, round_=0)
    assert torch.equal(table, table0) and torch.equal(user_emb, user0)
    assert torch.equal(first.row_item, second.row_item)
    assert torch.equal(first.row_user, second.row_user)
    assert torch.equal(first.row_value, second.row_value)
    assert torch.equal(first.user_embeddings, second.user_embeddings)
    # another round draws other negatives
    other = train_local(batch, table, user_emb, config, seed=1, round_=1)
    assert not torch.equal(first.row_item, other.row_item)


def test_one_minibatch_covering_everything_equals_full_batch():
    train, known = _dataset(2)
    table, user_emb = _start(2)
    batch = _batch(range(NUM_USERS), train, known)
    full = train_local(batch, table, user_emb, LocalTrainConfig(epochs=2, num_negatives=2),
                       seed=3)
    big = train_local(batch, table, user_emb,
                      LocalTrainConfig(epochs=2, num_negatives=2, batch_size=1000), seed=3)
    assert torch.equal(full.row_item, big.row_item)
    torch.testing.assert_close(full.row_value, big.row_value, atol=1e-6, rtol=0)
    torch.testing.assert_close(full.user_embeddings, big.user_embeddings, atol=1e-6, rtol=0)


def test_weighted_sum_equals_explicit_sum_of_tables():
    train, known = _dataset()
    table, user_emb = _start()
    update = train_local(_batch(range(NUM_USERS), train, known), table, user_emb,
                         CONFIGS["mini-batch"], seed=2)
    weights = torch.rand(NUM_USERS, generator=torch.Generator().manual_seed(5))
    weights[0] = 0.0
    expected = sum(weights[b] * update.item_table(b, table) for b in range(NUM_USERS))
    torch.testing.assert_close(update.weighted_sum(table, weights), expected, atol=1e-5,
                               rtol=1e-5)
    # normalised weights of identical tables give the start table back
    idle = LocalUpdate(np.arange(3), torch.zeros(3, DIM), torch.zeros(0, dtype=torch.long),
                       torch.zeros(0, dtype=torch.long), torch.zeros(0, DIM))
    torch.testing.assert_close(idle.weighted_sum(table, torch.full((3,), 1 / 3)), table)


def test_only_positive_and_negative_rows_change_and_known_items_are_never_negatives():
    train, known = _dataset(4)
    # make some users know almost everything beyond their training items
    rng = np.random.default_rng(0)
    for u in (1, 2, 7):
        extra = rng.choice(np.setdiff1d(np.arange(NUM_ITEMS), train[u]), 45, replace=False)
        known[u] = np.union1d(train[u], extra)
    table, user_emb = _start(4)
    config = LocalTrainConfig(epochs=3, num_negatives=3, batch_size=2)
    update = train_local(_batch(range(NUM_USERS), train, known), table, user_emb, config,
                         seed=11)
    # rows are owned once: (user, item) pairs are unique
    pairs = list(zip(update.row_user.tolist(), update.row_item.tolist(), strict=True))
    assert len(pairs) == len(set(pairs))
    for b in range(NUM_USERS):
        rows = set(update.row_item[update.row_user == b].tolist())
        positives = set(train[b].tolist())
        assert positives <= rows
        negatives = rows - positives
        assert not negatives & set(known[b].tolist())
        assert len(negatives) <= len(positives) * config.num_negatives * config.epochs
        if positives:
            assert negatives
        v = update.item_table(b, table)
        untouched = sorted(set(range(NUM_ITEMS)) - rows)
        assert torch.equal(v[untouched], table[untouched])
        changed = set(torch.nonzero((v != table).any(1)).squeeze(1).tolist())
        assert changed <= rows
        assert positives <= changed  # every positive receives a gradient


def _ego_loss(e_u, pos, negs, reg):
    """Eq. 15 on the ego graph for one user, written from the module docstring.

    ``pos`` and ``negs`` are lists of row tensors, one (positive, negative) pair per index.
    """
    n = len(pos)
    u = 0.5 * (e_u + sum(pos) / math.sqrt(n))
    terms = []
    for v_i, v_j in zip(pos, negs, strict=True):
        vi = 0.5 * (v_i + e_u / math.sqrt(n))
        vj = 0.5 * v_j
        margin = F.cosine_similarity(u, vi, dim=0) - F.cosine_similarity(u, vj, dim=0)
        terms.append(-F.logsigmoid(margin) + reg * (v_i.pow(2).sum() + v_j.pow(2).sum()))
    return sum(terms) / n + reg * e_u.pow(2).sum()


@pytest.mark.parametrize(("reg", "lr"), [(0.0, 0.5), (0.05, 0.3)])
def test_single_sgd_step_by_hand(reg, lr):
    user, positive = 3, 10
    known = np.array([2, 10, 40])
    table, users = _start(9)
    e0 = users[user:user + 1]
    batch = UserBatch.from_lists([user], [np.array([positive])], [known], NUM_ITEMS)
    config = LocalTrainConfig(epochs=1, lr=lr, reg=reg, num_negatives=1)
    out = train_local(batch, table, e0, config, seed=5, round_=2)

    rows = out.row_item.tolist()
    assert len(rows) == 2 and positive in rows
    negative = next(i for i in rows if i != positive)
    assert negative not in known.tolist()

    e_u = e0[0].clone().requires_grad_(True)
    v_i = table[positive].clone().requires_grad_(True)
    v_j = table[negative].clone().requires_grad_(True)
    # u = (e_u + v_i / sqrt(1)) / 2, v_i' = (v_i + e_u) / 2, v_j' = v_j / 2
    u = 0.5 * (e_u + v_i)
    margin = (F.cosine_similarity(u, 0.5 * (v_i + e_u), dim=0)
              - F.cosine_similarity(u, 0.5 * v_j, dim=0))
    loss = -F.logsigmoid(margin) + reg * (e_u.pow(2).sum() + v_i.pow(2).sum()
                                          + v_j.pow(2).sum())
    g_u, g_i, g_j = torch.autograd.grad(loss, (e_u, v_i, v_j))

    v = out.item_table(0, table)
    torch.testing.assert_close(v[positive], table[positive] - lr * g_i, atol=1e-6, rtol=0)
    torch.testing.assert_close(v[negative], table[negative] - lr * g_j, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.user_embeddings[0], e0[0] - lr * g_u, atol=1e-6, rtol=0)
    others = [i for i in range(NUM_ITEMS) if i not in (positive, negative)]
    assert torch.equal(v[others], table[others])
    assert g_i.abs().sum() > 0 and g_j.abs().sum() > 0


def test_two_epochs_two_positives_with_a_forced_negative_by_hand():
    # Five of six items known: item 5 is the only possible negative, so every pair is known.
    num_items, user, lr = 6, 0, 0.4
    gen = torch.Generator().manual_seed(21)
    table = torch.randn(num_items, 4, generator=gen)
    e0 = torch.randn(1, 4, generator=gen)
    positives = [1, 3]
    batch = UserBatch.from_lists([user], [np.array(positives)], [np.array([0, 1, 2, 3, 4])],
                                 num_items)
    config = LocalTrainConfig(epochs=2, lr=lr, reg=0.0, num_negatives=1)
    out = train_local(batch, table, e0, config, seed=0)
    assert sorted(out.row_item.tolist()) == [1, 3, 5]

    _assert_autograd_sgd(out, table, e0, lr, lambda e_u, rows: _ego_loss(
        e_u, [rows[1], rows[3]], [rows[5], rows[5]], 0.0))  # two full-batch epochs
    assert torch.equal(out.item_table(0, table)[[0, 2, 4]], table[[0, 2, 4]])


def _assert_autograd_sgd(out, table: torch.Tensor, e0: torch.Tensor, lr: float, loss_of,
                         epochs: int = 2) -> None:
    """``out`` equals ``epochs`` plain SGD steps on rows 1, 3, 5 and the user embedding, with
    gradients from autograd on ``loss_of(e_u, rows)``."""
    e_u = e0[0].clone()
    rows = {i: table[i].clone() for i in (1, 3, 5)}
    for _ in range(epochs):
        e_u.requires_grad_(True)
        for r in rows.values():
            r.requires_grad_(True)
        grads = torch.autograd.grad(loss_of(e_u, rows), (e_u, rows[1], rows[3], rows[5]))
        with torch.no_grad():
            e_u = e_u - lr * grads[0]
            rows = {i: rows[i] - lr * g for i, g in zip((1, 3, 5), grads[1:], strict=True)}
    v = out.item_table(0, table)
    for i in (1, 3, 5):
        torch.testing.assert_close(v[i], rows[i], atol=1e-6, rtol=0)
    torch.testing.assert_close(out.user_embeddings[0], e_u, atol=1e-6, rtol=0)


def _average_bpr(e_u: torch.Tensor, v: torch.Tensor, positives: np.ndarray,
                 negatives: np.ndarray) -> float:
    """Mean ego-graph cosine BPR over every (positive, unknown item) pair."""
    n = len(positives)
    u = 0.5 * (e_u + v[positives].sum(0) / math.sqrt(n))
    vi = 0.5 * (v[positives] + e_u / math.sqrt(n))
    vj = 0.5 * v[negatives]
    cos_i = F.cosine_similarity(u[None], vi)
    cos_j = F.cosine_similarity(u[None], vj)
    return float(-F.logsigmoid(cos_i[:, None] - cos_j[None, :]).mean())


def test_training_lowers_the_bpr_loss():
    table, users = _start(13)
    positives = np.array([3, 8, 15, 22, 41, 50])
    negatives = np.setdiff1d(np.arange(NUM_ITEMS), positives)
    batch = UserBatch.from_lists([6], [positives], [positives], NUM_ITEMS)
    e0 = users[6:7]
    before = _average_bpr(e0[0], table, positives, negatives)
    losses = []
    for epochs in (5, 30):
        out = train_local(batch, table, e0, LocalTrainConfig(epochs=epochs, num_negatives=4),
                          seed=0)
        losses.append(_average_bpr(out.user_embeddings[0], out.item_table(0, table),
                                   positives, negatives))
    assert losses[0] < before
    assert losses[1] < losses[0]


def test_user_representation_formula():
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(10, 3, generator=gen)
    e = torch.randn(3, 3, generator=gen)
    lists = [[1, 4, 7], [], [2, 9]]  # the middle user has no item
    indptr = torch.tensor([0, 3, 3, 5])
    items = torch.tensor([1, 4, 7, 2, 9])
    got = user_representation(e, table, indptr, items)
    for b, its in enumerate(lists):
        agg = table[its].sum(0) / math.sqrt(len(its)) if its else torch.zeros(3)
        torch.testing.assert_close(got[b], 0.5 * (e[b] + agg), atol=1e-6, rtol=0)


def test_user_batch_from_lists():
    batch = UserBatch.from_lists([7, 2, 5], [np.array([1, 3]), np.array([], np.int64),
                                             np.array([0])],
                                 [np.array([1, 3, 4]), np.array([6]), np.array([0])], 10)
    assert batch.users.tolist() == [7, 2, 5]
    assert batch.indptr.tolist() == [0, 2, 2, 3]
    assert batch.items.tolist() == [1, 3, 0]
    assert batch.sizes.tolist() == [2, 0, 1]
    assert batch.known_keys.tolist() == sorted([71, 73, 74, 26, 50])


def test_two_negatives_per_positive_with_regularisation_by_hand():
    """k = 2 pairs per positive and epoch, reg > 0: each step's gradient, taken by autograd on
    the written-out loss, equals the trainer's hand-written one."""
    num_items, lr, reg = 6, 0.3, 0.05
    gen = torch.Generator().manual_seed(4)
    table = torch.randn(num_items, 5, generator=gen)
    e0 = torch.randn(1, 5, generator=gen)
    positives = [1, 3]
    batch = UserBatch.from_lists([0], [np.array(positives)], [np.array([0, 1, 2, 3, 4])],
                                 num_items)  # item 5 is the only possible negative
    config = LocalTrainConfig(epochs=2, lr=lr, reg=reg, num_negatives=2)
    out = train_local(batch, table, e0, config, seed=1)

    def loss_of(e_u: torch.Tensor, rows: dict) -> torch.Tensor:  # four pairs per epoch
        u = 0.5 * (e_u + (rows[1] + rows[3]) / math.sqrt(2))
        pairs = [(1, 5), (1, 5), (3, 5), (3, 5)]
        per_pair = [-F.logsigmoid(F.cosine_similarity(u, 0.5 * (rows[i] + e_u / math.sqrt(2)),
                                                      dim=0)
                                  - F.cosine_similarity(u, 0.5 * rows[j], dim=0))
                    + reg * (rows[i].pow(2).sum() + rows[j].pow(2).sum()) for i, j in pairs]
        return sum(per_pair) / len(pairs) + reg * e_u.pow(2).sum()

    _assert_autograd_sgd(out, table, e0, lr, loss_of)


def test_compiled_negatives_equal_the_numpy_sampling_stream():
    """The kernel's SplitMix64 draws are :func:`sample_negatives`'s, slot for slot."""
    from fedshare.models import local_kernel
    from fedshare.sampling import sample_negatives

    train, known = _dataset(6)
    users = np.array([3, 0, 29, 7, 12])
    batch = _batch(users, train, known)
    k, epochs, seed, round_ = 3, 2, 17, 4
    per = k * epochs
    negatives = np.empty(len(batch.items) * per, np.int64)
    rows = np.empty(len(batch.items) * (1 + per), np.int64)
    count = np.zeros(len(users), np.int64)
    lo = np.searchsorted(batch.known_keys, users * NUM_ITEMS)
    hi = np.searchsorted(batch.known_keys, (users + 1) * NUM_ITEMS)
    assert local_kernel.sample_rows(0, len(users), users, batch.indptr, batch.items, lo, hi,
                                    batch.known_keys % NUM_ITEMS, NUM_ITEMS, k, epochs, seed,
                                    round_, 1000, negatives, rows, count)
    owner = np.repeat(users, batch.sizes * per)
    slots = np.concatenate([np.arange(n * per) for n in batch.sizes])
    expected = sample_negatives(owner, slots, batch.known_keys, NUM_ITEMS, seed, round_)
    assert np.array_equal(negatives, expected)
    for b in range(len(users)):  # private rows: sorted unique positives and negatives
        mine = negatives[batch.indptr[b] * per: batch.indptr[b + 1] * per]
        start = batch.indptr[b] * (1 + per)
        assert rows[start: start + count[b]].tolist() == sorted(
            set(train[users[b]].tolist()) | set(mine.tolist()))


def test_a_user_who_knows_every_item_cannot_sample_negatives():
    batch = UserBatch.from_lists([0], [np.array([1])], [np.arange(NUM_ITEMS)], NUM_ITEMS)
    table, user_emb = _start()
    with pytest.raises(FedShareError, match="cannot sample negatives"):
        train_local(batch, table, user_emb[:1], CONFIGS["full-batch"])


@pytest.fixture
def threads():
    """Set torch's thread budget (the kernels' too) for one test, then restore it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_training_and_averaging_do_not_depend_on_the_thread_count(threads):
    train, known = _dataset(8)
    table, user_emb = _start(8)
    batch = _batch(range(NUM_USERS), train, known)
    rng = np.random.default_rng(3)
    n = 300_000  # several fixed row ranges in the weighted sum
    big = LocalUpdate(np.arange(50), torch.zeros(50, DIM),
                      torch.from_numpy(rng.integers(0, 50, n)),
                      torch.from_numpy(rng.integers(0, NUM_ITEMS, n)),
                      torch.from_numpy(rng.standard_normal((n, DIM)).astype(np.float32)))
    weights = torch.rand(50, generator=torch.Generator().manual_seed(1))
    results = []
    for count in (1, 2, 3):
        threads(count)
        update = train_local(batch, table, user_emb, CONFIGS["mini-batch"], seed=4)
        results.append((update.row_value, update.user_embeddings,
                        update.weighted_sum(table, torch.rand(NUM_USERS, generator=torch.Generator(
                        ).manual_seed(2))), big.weighted_sum(table, weights)))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))
    # and the big sum is the plain one
    expected = table * weights.sum() + torch.zeros_like(table).index_add_(
        0, big.row_item, (big.row_value - table[big.row_item]) * weights[big.row_user, None])
    torch.testing.assert_close(results[0][3], expected, atol=1e-3, rtol=1e-5)


def test_ranges_have_about_equal_cost_and_keep_their_order():
    from fedshare.models.local_kernel import run_ranges

    cost = np.array([100, 1, 1, 1, 1, 100, 1, 1, 50, 50])
    spans = run_ranges(lambda lo, hi: (lo, hi), cost, 2)
    assert spans[0][0] == 0 and spans[-1][1] == len(cost)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))  # contiguous, in order
    # cut at cost quantiles (RANGES_PER_THREAD per thread): no range exceeds a share plus one user
    assert len(spans) > 2
    assert max(int(cost[lo:hi].sum()) for lo, hi in spans) <= cost.sum() / 8 + cost.max()
    assert run_ranges(lambda lo, hi: (lo, hi), cost, 1) == [(0, len(cost))]
    assert run_ranges(lambda lo, hi: (lo, hi), np.zeros(0), 2) == []


def _ranges_in_child(queue) -> None:
    from fedshare.models.local_kernel import run_ranges

    queue.put(run_ranges(lambda lo, hi: hi - lo, np.ones(16), 2))


def test_a_forked_child_does_not_use_the_parents_thread_pool():
    """The child inherits the pool object but none of its threads: it must make its own."""
    import multiprocessing

    from fedshare.models.local_kernel import run_ranges

    assert sum(run_ranges(lambda lo, hi: hi - lo, np.ones(16), 2)) == 16  # parent's pool exists
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_ranges_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0
    assert sum(queue.get(timeout=5)) == 16
