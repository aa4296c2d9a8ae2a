"""Counter-based negative sampling: valid, reproducible, batch-independent, uniform."""

from __future__ import annotations

import numpy as np
import pytest

from fedshare.errors import FedShareError
from fedshare.sampling import counter_hash, counter_uniform, sample_negatives, splitmix64

NUM_ITEMS = 30


def _known(seed: int = 0, num_users: int = 10) -> dict[int, set[int]]:
    rng = np.random.default_rng(seed)
    return {u: set(rng.choice(NUM_ITEMS, size=int(rng.integers(1, 25)), replace=False).tolist())
            for u in range(num_users)}


def _keys(known: dict[int, set[int]]) -> np.ndarray:
    return np.array(sorted(u * NUM_ITEMS + i for u, items in known.items() for i in items),
                    dtype=np.int64)


def test_never_returns_a_known_interaction():
    known = _known()
    users = np.repeat(np.arange(10), 200)
    slots = np.tile(np.arange(200), 10)
    items = sample_negatives(users, slots, _keys(known), NUM_ITEMS, seed=3, round_=1)
    assert items.shape == users.shape
    assert items.dtype == np.int64
    assert items.min() >= 0 and items.max() < NUM_ITEMS
    for u, i in zip(users.tolist(), items.tolist(), strict=True):
        assert i not in known[u]


def test_same_inputs_give_same_outputs_and_keys_matter():
    known = _known(1)
    users = np.repeat(np.arange(10), 50)
    slots = np.tile(np.arange(50), 10)
    a = sample_negatives(users, slots, _keys(known), NUM_ITEMS, seed=0, round_=0)
    b = sample_negatives(users.copy(), slots.copy(), _keys(known), NUM_ITEMS, seed=0, round_=0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, sample_negatives(users, slots, _keys(known), NUM_ITEMS,
                                                  seed=1, round_=0))
    assert not np.array_equal(a, sample_negatives(users, slots, _keys(known), NUM_ITEMS,
                                                  seed=0, round_=1))


def test_draws_do_not_depend_on_other_users_in_the_call():
    known = _known(2)
    slots5 = np.arange(40)
    users = np.concatenate([np.full(40, 3), np.full(40, 5), np.full(40, 7)])
    slots = np.concatenate([slots5, slots5, slots5])
    together = sample_negatives(users, slots, _keys(known), NUM_ITEMS, seed=9, round_=4)
    alone = sample_negatives(np.full(40, 5), slots5, _keys(known), NUM_ITEMS, seed=9, round_=4)
    only_own_keys = sample_negatives(np.full(40, 5), slots5, _keys({5: known[5]}), NUM_ITEMS,
                                     seed=9, round_=4)
    np.testing.assert_array_equal(together[40:80], alone)
    np.testing.assert_array_equal(alone, only_own_keys)
    # interleaved order and a shuffled call give the same per-draw results too
    perm = np.random.default_rng(0).permutation(len(users))
    shuffled = sample_negatives(users[perm], slots[perm], _keys(known), NUM_ITEMS, seed=9,
                                round_=4)
    np.testing.assert_array_equal(shuffled, together[perm])


def test_every_unknown_item_is_drawn_roughly_uniformly():
    known = {0: {0, 7, 19}, 1: set(range(NUM_ITEMS - 1))}
    n = 3000
    items = sample_negatives(np.zeros(n, np.int64), np.arange(n), _keys(known), NUM_ITEMS,
                             seed=2, round_=0)
    counts = np.bincount(items, minlength=NUM_ITEMS)
    unknown = sorted(set(range(NUM_ITEMS)) - known[0])
    assert counts[sorted(known[0])].sum() == 0
    expected = n / len(unknown)  # about 111
    assert counts[unknown].min() > 0.5 * expected
    assert counts[unknown].max() < 1.5 * expected
    # a user knowing all but one item always gets that item
    last = sample_negatives(np.ones(50, np.int64), np.arange(50), _keys(known), NUM_ITEMS,
                            seed=2)
    assert set(last.tolist()) == {NUM_ITEMS - 1}


def test_no_known_interactions_at_all():
    items = sample_negatives(np.arange(5), np.zeros(5, np.int64), np.zeros(0, np.int64),
                             NUM_ITEMS, seed=0)
    assert items.shape == (5,)
    assert ((items >= 0) & (items < NUM_ITEMS)).all()


def test_empty_request():
    items = sample_negatives(np.zeros(0, np.int64), np.zeros(0, np.int64), _keys(_known()),
                             NUM_ITEMS, seed=0)
    assert items.shape == (0,)


def test_user_knowing_every_item_raises():
    known = {0: {1, 2}, 1: set(range(NUM_ITEMS))}
    with pytest.raises(FedShareError):
        sample_negatives(np.array([0, 1]), np.array([0, 0]), _keys(known), NUM_ITEMS, seed=0)
    with pytest.raises(FedShareError):
        sample_negatives(np.array([1]), np.array([0]), _keys(known), NUM_ITEMS, seed=0,
                         max_attempts=20)


def test_counter_uniform_in_unit_interval():
    keys = np.arange(200_000)
    x = counter_uniform(7, 3, keys)
    assert x.dtype == np.float64
    assert x.min() >= 0.0 and x.max() < 1.0
    assert abs(x.mean() - 0.5) < 0.01
    assert len(np.unique(x)) > 199_000
    # the largest 64-bit hash still maps below 1
    top = (np.uint64(2**64 - 1) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    assert top < 1.0
    # broadcasting and determinism
    np.testing.assert_array_equal(counter_uniform(7, 3, keys[:10]), x[:10])
    assert counter_uniform(7, 3, 5) == x[5]


def test_counter_hash_is_a_pure_function_of_the_key_tuple():
    a = counter_hash(1, 2, np.arange(5))
    np.testing.assert_array_equal(a, counter_hash(1, 2, np.arange(5)))
    assert len(set(a.tolist())) == 5
    assert not np.array_equal(a, counter_hash(2, 1, np.arange(5)))


def test_splitmix64_reference_values():
    # First outputs of the reference SplitMix64 generator seeded with 0 (Vigna):
    # state s_k = k * golden, output = mix(s_k); splitmix64(x) mixes x + golden.
    golden = 0x9E3779B97F4A7C15
    states = np.array([0, golden, (2 * golden) % 2**64], dtype=np.uint64)
    out = splitmix64(states).tolist()
    assert out == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def _reference_negatives(users, slots, known_keys, num_items, seed, round_):
    """The stream's definition, one draw at a time in numpy: the first attempt whose item the
    user does not know."""
    known = set(known_keys.tolist())
    out = []
    for u, s in zip(users.tolist(), slots.tolist(), strict=True):
        for attempt in range(1000):
            item = int(counter_hash(seed, round_, u, s, attempt) % np.uint64(num_items))
            if u * num_items + item not in known:
                out.append(item)
                break
    return np.array(out, dtype=np.int64)


@pytest.mark.parametrize(("seed", "round_"), [(0, 0), (3, 7), (11, (5 << 16) + 9)])
def test_compiled_draws_equal_the_streams_definition(seed, round_):
    known = _known(seed, num_users=12)
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 12, size=300)
    slots = rng.integers(0, 1 << 20, size=300)
    got = sample_negatives(users, slots, _keys(known), NUM_ITEMS, seed=seed, round_=round_)
    np.testing.assert_array_equal(
        got, _reference_negatives(users, slots, _keys(known), NUM_ITEMS, seed, round_))
