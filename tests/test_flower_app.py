"""The real Flower app (ServerApp + ClientApps on Ray virtual SuperNodes) on a tiny dataset.

Two Flower simulations are shared by every test of this module (each costs ~25 s):

- ``cohorts``: 2 SuperNodes, each serving a contiguous cohort of users, with a message audit;
- ``per-user``: one SuperNode per user (``array_split`` gives each node one user);

plus the in-process engine with the same settings. Cohorts, per-user nodes and the in-process
engine must give the same model (Eq. 16 averages over users, however they are grouped), and
the audit shows what reached the server: only I_share interactions, never I_local ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from synthetic import tiny_prepared

from fedshare.data.prepared import PreparedData
from fedshare.data.sharing import FULL, NONE, PARTIAL
from fedshare.federated.rounds import sample_users
from simulations.experiment import resolve, run_experiment

NUM_USERS, NUM_ITEMS, DIM, SEED, ROUNDS, FRACTION = 10, 40, 8, 0, 2, 0.5
SHARE_ARRAYS = {"arrays/served-users", "arrays/local-counts", "arrays/share-users",
                "arrays/share-items"}
TRAIN_ARRAYS = {"arrays/item-table", "arrays/row-weight"}
STEM = re.compile(r"^\d{6}-(?P<kind>share|train|evaluate)-r(?P<round>-?\d+)-n(?P<node>\d+)$")


def _superlinks() -> dict[int, str]:
    """Command lines of running ``flower-superlink`` processes, by pid."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "flower-superlink" in cmdline and int(proc.name) != os.getpid():
            found[int(proc.name)] = cmdline
    return found


def _stop_orphans(pids: set[int]) -> None:
    """Stop SuperLinks of ``run_flower`` whose private FLWR_HOME is gone (their run is over)."""
    for pid, cmdline in _superlinks().items():
        home = re.search(r"--database (\S*/fedshare-flwr-[^/\s]+)/", cmdline)
        if pid in pids and home and not Path(home[1]).exists():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)


def assert_superlinks_gone(before: dict[int, str]) -> None:
    """After a Flower run: wait up to 20 s for the SuperLinks it started to stop, clean up any
    left, then report them (``before``: the SuperLinks running before the run)."""
    deadline = time.monotonic() + 20
    while set(_superlinks()) - set(before) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = {pid: cmd for pid, cmd in _superlinks().items() if pid not in before}
    _stop_orphans(set(left))  # clean up, then report what run_flower left behind
    assert not left, f"flower-superlink processes left running: {left}"


@pytest.fixture(scope="module")
def data() -> PreparedData:
    prepared = tiny_prepared()
    assert (prepared.split.train.user_degrees() >= 1).all()
    assert set(prepared.plan.group.tolist()) == {FULL, PARTIAL, NONE}
    return prepared


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """The two Flower runs and the in-process run; no SuperLink of ours outlives them."""
    before = _superlinks()
    root = tmp_path_factory.mktemp("flower")
    folder = data.save(root / "tiny")
    audit = root / "audit"
    settings = [f"prepared={folder}", f"rounds={ROUNDS}", "eval-every=2",
                f"fraction={FRACTION}", f"dim={DIM}", "server-steps=2", "local-epochs=2",
                f"seed={SEED}", "defence=none"]  # plain replies: compared exactly, audited
    try:
        cohorts = resolve(None, [*settings, "num-supernodes=2", f"audit-dir={audit}"],
                          name="cohorts")
        per_user = resolve(None, [*settings, f"num-supernodes={NUM_USERS}", "fru-alpha=0.5"],
                           name="per-user")  # also keeps FRU's stores on the nodes
        results = {
            "cohorts": run_experiment(cohorts, root / "runs", "flower"),
            "per-user": run_experiment(per_user, root / "runs", "flower"),
            "inprocess": run_experiment(resolve(None, [*settings, "num-supernodes=2"],
                                                name="inprocess"), root / "runs", "inprocess"),
        }
        yield {**results, "audit": audit}
    finally:
        assert_superlinks_gone(before)


def _table(runs, name: str) -> np.ndarray:
    return np.load(runs[name][0] / "item_table.npy")


def _assert_same_metrics(a: dict, b: dict) -> None:
    for part in ("valid", "test"):
        assert set(a[part]) == set(b[part]) == {"hr@20", "recall@20", "ndcg@20"}
        for key, value in a[part].items():
            assert value == pytest.approx(b[part][key], abs=1e-5), (part, key)


def test_flower_run_folder(runs, data):
    for name, nodes in (("cohorts", 2), ("per-user", NUM_USERS)):
        out, summary = runs[name]
        assert {p.name for p in out.iterdir()} >= {"config.toml", "metrics.csv", "summary.json",
                                                   "item_table.npy", "flower.log"}
        assert json.loads((out / "summary.json").read_text()) == summary
        assert summary["engine"] == "flower" and summary["variant"] == "fedshare"
        assert summary["rounds"] == ROUNDS and summary["nodes"] == nodes
        assert summary["shared_interactions"] == int(data.plan.shared.sum())
        assert summary["snapshots"] == ROUNDS
        assert summary["snapshot_bytes"] == ROUNDS * NUM_ITEMS * DIM * 4
        metrics = pd.read_csv(out / "metrics.csv")  # one row per round, validated at the last
        assert metrics["round"].tolist() == list(range(1, ROUNDS + 1))
        assert metrics["valid_hr@20"].notna().tolist() == [False] * (ROUNDS - 1) + [True]
        assert (metrics["num-users"] > 0).all()
        table = np.load(out / "item_table.npy")
        assert table.shape == (NUM_ITEMS, DIM) and np.isfinite(table).all()
        for part in ("valid", "test"):
            assert all(0.0 <= v <= 1.0 for v in summary[part].values())


def test_cohorts_equal_one_user_per_node(runs):
    np.testing.assert_allclose(_table(runs, "cohorts"), _table(runs, "per-user"), atol=1e-5,
                               rtol=0)
    _assert_same_metrics(runs["cohorts"][1], runs["per-user"][1])
    history = [pd.read_csv(runs[name][0] / "metrics.csv") for name in ("cohorts", "per-user")]
    for column in ("valid_hr@20", "valid_recall@20", "valid_ndcg@20"):
        np.testing.assert_allclose(history[0][column], history[1][column], atol=1e-5)


def test_flower_equals_the_inprocess_engine(runs):
    np.testing.assert_allclose(_table(runs, "cohorts"), _table(runs, "inprocess"), atol=1e-5,
                               rtol=0)
    _assert_same_metrics(runs["cohorts"][1], runs["inprocess"][1])


def test_both_engines_write_one_summary_schema_and_one_metrics_table(runs):
    flower, inprocess = runs["cohorts"][1], runs["inprocess"][1]
    assert set(flower) == set(inprocess)
    assert flower["nodes"] == 2 and inprocess["nodes"] is None
    frames = [pd.read_csv(runs[name][0] / "metrics.csv") for name in ("cohorts", "inprocess")]
    assert list(frames[0].columns) == list(frames[1].columns)
    assert frames[0]["num-users"].tolist() == frames[1]["num-users"].tolist()
    np.testing.assert_allclose(frames[0]["num-examples"], frames[1]["num-examples"])


def _audit(folder: Path) -> list[tuple[str, int, int, dict[str, np.ndarray], dict]]:
    """(kind, round, node, arrays, metrics) of every logged reply."""
    stems = {p.stem for p in folder.iterdir()}
    assert {p.name for p in folder.iterdir()} == {f"{s}{ext}" for s in stems
                                                  for ext in (".npz", ".json")}
    replies = []
    for stem in sorted(stems):
        match = STEM.match(stem)
        assert match, stem
        with np.load(folder / f"{stem}.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        metrics = json.loads((folder / f"{stem}.json").read_text())
        replies.append((match["kind"], int(match["round"]), int(match["node"]), arrays, metrics))
    return replies


def test_privacy_audit_of_every_reply(runs, data):
    replies = _audit(runs["audit"])
    kinds = [r[0] for r in replies]
    assert kinds.count("share") == 2  # one share reply per node, before any training
    assert kinds[:2] == ["share", "share"]
    train, shared_flags = data.split.train, data.plan.shared
    local_sizes = np.bincount(train.users[~shared_flags], minlength=NUM_USERS)

    integer_keys = {key for *_, arrays, _ in replies for key, value in arrays.items()
                    if np.issubdtype(value.dtype, np.integer)}
    assert integer_keys == SHARE_ARRAYS

    served: dict[int, np.ndarray] = {}
    share_pairs = []
    for kind, round_, node, arrays, metrics in replies:
        if kind != "share":
            continue
        assert round_ == 0
        assert set(arrays) == SHARE_ARRAYS
        assert all(np.issubdtype(v.dtype, np.integer) for v in arrays.values())
        assert set(metrics) == {"metrics/num-items", "metrics/num-users-total"}
        assert (metrics["metrics/num-items"], metrics["metrics/num-users-total"]) == \
            (NUM_ITEMS, NUM_USERS)
        users = arrays["arrays/served-users"]
        served[node] = users
        np.testing.assert_array_equal(arrays["arrays/local-counts"], local_sizes[users])
        share_users, share_items = arrays["arrays/share-users"], arrays["arrays/share-items"]
        assert len(share_users) == len(share_items)
        assert np.isin(share_users, users).all()  # a node uploads only its own users' I_share
        share_pairs += list(zip(share_users.tolist(), share_items.tolist(), strict=True))
    np.testing.assert_array_equal(np.sort(np.concatenate(list(served.values()))),
                                  np.arange(NUM_USERS))
    expected_share = sorted(zip(train.users[shared_flags].tolist(),
                                train.items[shared_flags].tolist(), strict=True))
    assert sorted(share_pairs) == expected_share
    local_pairs = set(zip(train.users[~shared_flags].tolist(),
                          train.items[~shared_flags].tolist(), strict=True))
    assert local_pairs and local_pairs.isdisjoint(share_pairs)

    trainable = np.flatnonzero(local_sizes > 0)
    train_rounds = set()
    for kind, round_, node, arrays, metrics in replies:
        if kind == "train":
            train_rounds.add(round_)
            assert set(arrays) == TRAIN_ARRAYS
            assert arrays["arrays/item-table"].shape == (NUM_ITEMS, DIM)
            assert arrays["arrays/row-weight"].shape == (NUM_ITEMS,)
            assert all(np.issubdtype(v.dtype, np.floating) for v in arrays.values())
            assert set(metrics) == {"metrics/num-examples", "metrics/num-users"}
            # the node trained exactly its share of the round's sample, weighted by |I_local|
            mine = np.intersect1d(sample_users(trainable, FRACTION, SEED, round_), served[node])
            assert len(mine) > 0
            assert metrics["metrics/num-users"] == len(mine)
            assert metrics["metrics/num-examples"] == float(local_sizes[mine].sum())
        elif kind == "evaluate":
            assert arrays == {}
            names = ("hr@20", "recall@20", "ndcg@20", "count")  # sums and the user count
            assert set(metrics) in ({f"metrics/valid:{n}" for n in names},
                                    {f"metrics/{p}:{n}" for p in ("valid", "test")
                                     for n in names})
    assert train_rounds == set(range(1, ROUNDS + 1))
    for round_ in range(1, ROUNDS + 1):
        sampled = sample_users(trainable, FRACTION, SEED, round_)
        nodes = {n for n, users in served.items() if np.isin(sampled, users).any()}
        assert {r[2] for r in replies if r[0] == "train" and r[1] == round_} == nodes
    # validation on round 2 (eval-every), then final validation and test in one message: every
    # node each time
    assert kinds.count("evaluate") == 2 * len(served)


def test_fru_stores_on_the_nodes_match_the_inprocess_ledger(runs, data):
    """With fru-alpha (FRU's other settings at their defaults: the paper's sampling), every
    node keeps its users' FRU rows in its context.state and reports their bytes; the server's
    ledger then holds exactly what the in-process FRU store holds."""
    from fedshare.unlearning.fru import KIND, FruSettings
    from fedshare.unlearning.phase import learn

    config = resolve(None, [f"rounds={ROUNDS}", "eval-every=2", f"fraction={FRACTION}",
                            f"dim={DIM}", "server-steps=2", "local-epochs=2",
                            f"seed={SEED}"]).config
    expected = learn(data, config, record=True, fru=FruSettings()).ledger.held(kind=KIND)
    assert expected > 0
    assert runs["per-user"][1]["fru_client_bytes"] == expected
    assert runs["cohorts"][1]["fru_client_bytes"] == 0  # fru-alpha = 0: nothing kept


def test_the_clientapp_does_not_import_the_servers_graph_code():
    """Every message of a deployed SuperNode starts a fresh ClientApp process: PyG (about 3 s
    of imports) is server-side only and must stay out of it."""
    import subprocess
    import sys

    code = "import sys, clients.app; print(sorted(m for m in sys.modules if m.startswith(" \
           "('torch_geometric', 'fedshare.graph', 'fedshare.unlearning.fru'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "[]"
