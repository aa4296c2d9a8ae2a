"""Saving and loading prepared data: exact round trip, no overwrite, tampering, corruption."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedshare.data import Interactions, PreparedData, SharingConfig, make_plan, prepare
from fedshare.data.split import split_by_parts, split_parts
from fedshare.errors import FedShareError

pytestmark = pytest.mark.usefixtures("offline")


def build(seed: int = 0, split_seed: int = 0) -> PreparedData:
    rng = np.random.default_rng(123)
    degrees = [1, 3, 8, 12, 20, 25, 5, 0, 17, 30]
    users = np.repeat(np.arange(len(degrees)), degrees)
    items = np.concatenate([rng.choice(40, n, replace=False) for n in degrees])
    data = Interactions.from_arrays(users, items, len(degrees), 40,
                                    rng.integers(0, 10**9, len(users)))
    fractions = (0.8, 0.1, 0.1)
    split = split_by_parts(data, split_parts(data, fractions, split_seed))
    config = SharingConfig(group_fractions=(0.3, 0.3, 0.4), unshare_user_fraction=0.5,
                           unshare_item_fraction=0.5, seed=seed)
    return PreparedData("toy", split, make_plan(split.train, config), split_seed, fractions)


def assert_same(a: PreparedData, b: PreparedData) -> None:
    assert (a.dataset, a.split_seed, a.split_fractions) == (b.dataset, b.split_seed,
                                                           b.split_fractions)
    assert (a.num_users, a.num_items) == (b.num_users, b.num_items)
    for pa, pb in [(a.split.train, b.split.train), (a.split.valid, b.split.valid),
                   (a.split.test, b.split.test)]:
        assert (pa.num_users, pa.num_items) == (pb.num_users, pb.num_items)
        for column in ("user", "item", "timestamp"):
            assert np.array_equal(pa.frame[column].to_numpy(), pb.frame[column].to_numpy())
    assert a.plan.config == b.plan.config
    for name in ("group", "shared", "unlearn"):
        x, y = getattr(a.plan, name), getattr(b.plan, name)
        assert x.dtype == y.dtype
        assert np.array_equal(x, y)
    assert a.fingerprint() == b.fingerprint()


def rewrite_npz(folder: Path, **changes) -> None:
    path = folder / "interactions.npz"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del arrays[key]
    np.savez_compressed(path, **arrays)


def edit_meta(folder: Path, edit) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    edit(meta)
    (folder / "meta.json").write_text(json.dumps(meta))


@pytest.fixture
def saved(tmp_path) -> tuple[PreparedData, Path]:
    prepared = build()
    return prepared, prepared.save(tmp_path / "runs" / "prepared")


def test_round_trip(saved):
    prepared, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == ["interactions.npz", "meta.json"]
    assert not [p for p in folder.parent.iterdir() if p != folder]  # no temp folder left
    loaded = PreparedData.load(folder)
    assert_same(prepared, loaded)
    assert loaded.split_fractions == (0.8, 0.1, 0.1)
    assert loaded.plan.config.group_fractions == (0.3, 0.3, 0.4)


def test_round_trip_of_prepare_from_a_file(tmp_path):
    lines = [f"{u}::{i}::{(u + i) % 5 + 1}::{1000 * u + i}\n"
             for u in range(1, 13) for i in range(1, 12 + u)]
    (tmp_path / "ratings.dat").write_text("".join(lines))
    config = SharingConfig(seed=4)
    prepared = prepare("ml-1m", tmp_path, min_user_interactions=15, split_seed=2,
                       sharing=config)
    # user u rates 11 + u movies: users 1..3 (12..14 ratings) fall below 15 and are dropped
    assert prepared.num_users == 9
    sizes = [len(prepared.split.train), len(prepared.split.valid), len(prepared.split.test)]
    assert sum(sizes) == sum(11 + u for u in range(4, 13))
    assert prepared.plan.config == config
    loaded = PreparedData.load(prepared.save(tmp_path / "prep"))
    assert_same(prepared, loaded)
    assert loaded.dataset == "ml-1m"
    assert loaded.split_seed == 2


def test_save_refuses_an_existing_folder(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(FedShareError, match="already exists"):
        build().save(folder)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    assert (folder / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folder left beside it


def test_save_does_not_overwrite_a_prepared_folder(saved):
    prepared, folder = saved
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    other = build(seed=1, split_seed=1)
    assert other.fingerprint() != prepared.fingerprint()
    with pytest.raises(FedShareError, match="already exists"):
        other.save(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert_same(prepared, PreparedData.load(folder))


def test_tampered_item_id_fails_the_fingerprint(saved):
    prepared, folder = saved
    with np.load(folder / "interactions.npz") as z:
        items = z["item"].copy()
    items[0] = (items[0] + 1) % prepared.num_items  # still a valid id
    rewrite_npz(folder, item=items)
    with pytest.raises(FedShareError, match="fingerprint"):
        PreparedData.load(folder)


def test_tampered_part_labels_fail_the_fingerprint(saved):
    _, folder = saved
    with np.load(folder / "interactions.npz") as z:
        part = z["part"].copy()
    first_valid = int(np.flatnonzero(part == 1)[0])
    part[first_valid] = 0  # move one validation row into training
    rewrite_npz(folder, part=part)
    with pytest.raises(FedShareError):
        PreparedData.load(folder)


def test_plan_cannot_be_applied_to_other_data(tmp_path):
    a = build(split_seed=0).save(tmp_path / "a")
    b = build(split_seed=1).save(tmp_path / "b")
    shutil.copy(b / "meta.json", a / "meta.json")
    with pytest.raises(FedShareError, match="fingerprint"):
        PreparedData.load(a)


@pytest.mark.parametrize("missing", ["meta.json", "interactions.npz"])
def test_missing_file(saved, missing):
    _, folder = saved
    (folder / missing).unlink()
    with pytest.raises(FedShareError, match=rf"not a prepared-data folder.*{missing}"):
        PreparedData.load(folder)


def test_missing_folder(tmp_path):
    with pytest.raises(FedShareError, match="not a prepared-data folder"):
        PreparedData.load(tmp_path / "never-written")


def test_unsupported_format_version(saved):
    _, folder = saved
    edit_meta(folder, lambda m: m.update(format=99))
    with pytest.raises(FedShareError, match="unsupported format 99"):
        PreparedData.load(folder)


def _truncate_npz(folder: Path) -> None:
    path = folder / "interactions.npz"
    path.write_bytes(path.read_bytes()[:100])


def _garbage_meta(folder: Path) -> None:
    (folder / "meta.json").write_text('{"format": 1, "dataset": ')


def _drop_array(name: str):
    return lambda folder: rewrite_npz(folder, **{name: None})


def _drop_meta_key(name: str):
    return lambda folder: edit_meta(folder, lambda m: m.pop(name))


def _item_out_of_range(folder: Path) -> None:
    with np.load(folder / "interactions.npz") as z:
        items = z["item"].copy()
    items[0] = 10**6
    rewrite_npz(folder, item=items)


def _shorten(name: str):
    def mutate(folder: Path) -> None:
        with np.load(folder / "interactions.npz") as z:
            shorter = z[name][:-1].copy()
        rewrite_npz(folder, **{name: shorter})
    return mutate


@pytest.mark.parametrize("corrupt", [
    pytest.param(_truncate_npz, id="truncated-npz"),
    pytest.param(_garbage_meta, id="invalid-json"),
    pytest.param(_drop_array("part"), id="npz-without-part"),
    pytest.param(_drop_meta_key("fingerprint"), id="meta-without-fingerprint"),
    pytest.param(_item_out_of_range, id="item-id-out-of-range"),
    pytest.param(_shorten("user"), id="user-array-too-short"),
    pytest.param(_shorten("shared"), id="shared-array-too-short"),
])
def test_corrupt_folder_raises_fedshare_error(saved, corrupt):
    _, folder = saved
    corrupt(folder)
    with pytest.raises(FedShareError) as info:
        PreparedData.load(folder)
    assert str(folder) in str(info.value)
