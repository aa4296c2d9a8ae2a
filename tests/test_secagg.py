"""SecAgg+ rounds equal plain rounds' sums (``defence = "secagg"``).

The protocol tests drive the real server (:class:`strategies.fedshare.FedShareStrategy` with
:class:`strategies.secagg.SecureRounds`) and the real node handlers (:mod:`clients.secagg`) in
this process: a grid that serialises every message through Flower's protobuf form and hands it
to the node's handler, each node with its own ``context.state``; only local training is replaced
by fixed updates, whose plain sums are then known. One short Flower simulation checks the whole
app against the in-process engine.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from synthetic import tiny_prepared

from clients import secagg
from fedshare import protocol
from fedshare.defences import UploadDefence, parse_defences
from fedshare.errors import FedShareError
from fedshare.federated.aggregation import aggregate
from fedshare.federated.config import FederatedConfig
from fedshare.federated.directory import Directory
from fedshare.federated.population import NodeUpdate
from fedshare.runconfig import (
    DEFAULT_DEFENCE,
    SECAGG_KEYS,
    SecAggSettings,
    secagg_settings,
    upload_defence,
)
from strategies.fedshare import FedShareStrategy

NUM_ITEMS, DIM = 40, 8
NODES = [17, 2**40 + 1, 2**62 + 5, 2**63 + 7, 5]  # Flower's node ids are uint64
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


pytestmark = pytest.mark.usefixtures("flower_task_identity")


class LocalGrid:
    """Nodes in this process: every message goes through protobuf to its node's handler, and
    back. A node in ``silent[stage]`` does not answer that stage's message (it dropped);
    ``updates`` are what each node's training yields from the table it is sent."""

    def __init__(self, deltas: dict[int, tuple[torch.Tensor, float, torch.Tensor, int]],
                 silent: dict[str, set[int]] | None = None) -> None:
        self.deltas, self.silent = deltas, silent or {}
        self.contexts = {n: Context(1, n, {}, RecordDict(), {}) for n in deltas}
        self.trained: dict[int, NodeUpdate] = {}
        self.handlers = {protocol.SECAGG_SETUP: secagg.setup,
                         protocol.SECAGG_SHARE_KEYS: secagg.share_keys,
                         protocol.SECAGG_TRAIN: self._train, protocol.SECAGG_UNMASK: secagg.unmask}

    def _train(self, msg: Message, context: Context) -> Message:
        def train(request: protocol.TrainRequest) -> NodeUpdate:
            delta, weight, row_weight, users = self.deltas[msg.metadata.dst_node_id]
            update = NodeUpdate(request.table + delta, weight, row_weight, users)
            self.trained[msg.metadata.dst_node_id] = update
            return update

        return secagg.masked_train(msg, context, train)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        replies = []
        for message in messages:
            message = message_from_proto(message_to_proto(message))
            node, kind = message.metadata.dst_node_id, message.metadata.message_type
            if node not in self.silent.get(kind, set()):
                reply = self.handlers[kind](message, self.contexts[node])
                replies.append(message_from_proto(message_to_proto(reply)))
        return replies


def _strategy(settings: SecAggSettings | None, aggregation: str = "touched"
              ) -> FedShareStrategy:
    """Five nodes of two users each; every user is sampled (fraction 1)."""
    data = tiny_prepared(10, NUM_ITEMS)
    config = FederatedConfig(dim=DIM, rounds=1, server_steps=0, seed=0, fraction=1.0,
                             aggregation=aggregation)
    directory = Directory({node: np.arange(2 * i, 2 * i + 2) for i, node in enumerate(NODES)},
                          {u: 2 + u % 4 for u in range(10)},
                          data.plan.shared_data(data.split.train))
    return FedShareStrategy(config, directory, max_failed=0.5, secagg=settings)


def _deltas(strategy: FedShareStrategy, seed: int = 0) -> dict:
    """Per node: a delta on some rows, the users' |D_u| sum, per-row weights, user count."""
    rng = np.random.default_rng(seed)
    deltas = {}
    for node, users in strategy.directory.node_users.items():
        counts = [strategy.directory.local_counts[int(u)] for u in users]
        touched = rng.random((len(users), NUM_ITEMS)) < 0.3  # rows each user touched
        row_weight = torch.tensor((touched * np.array(counts)[:, None]).sum(0), dtype=torch.float32)
        delta = torch.tensor(rng.normal(0, 0.3, (NUM_ITEMS, DIM)), dtype=torch.float32)
        delta[row_weight == 0] = 0.0
        deltas[node] = (delta, float(sum(counts)), row_weight, len(users))
    return deltas


def _round(strategy: FedShareStrategy, grid: LocalGrid) -> list[NodeUpdate] | None:
    messages = strategy.train_messages(1, grid)
    return strategy.accepted_updates(1, grid.send_and_receive(messages))


def _bound(strategy: FedShareStrategy, summed: int, weight: float) -> float:
    """The stated precision bound of one coordinate of the synthetic table (eq16 form)."""
    cfg, counts = strategy.secure.settings, strategy.directory.local_counts
    scale = sum(counts.values())
    return summed * (scale / weight) * 2 * cfg.clip / cfg.quantization


def _check_sum(strategy: FedShareStrategy, update: NodeUpdate, plain: list[NodeUpdate],
               start: torch.Tensor) -> None:
    weight = sum(u.weight for u in plain)
    s_delta = sum(u.weight * (u.table.double() - start.double()) for u in plain)
    assert update.weight == weight and update.num_users == sum(u.num_users for u in plain)
    assert torch.equal(update.row_weight, sum(u.row_weight for u in plain))  # exact
    error = (update.table.double() - (start.double() + s_delta / weight)).abs().max().item()
    assert error <= _bound(strategy, len(plain), weight) + 1e-6  # + float32 rounding
    for mode in ("eq16", "touched"):  # the round's aggregate is the plain one
        np.testing.assert_allclose(aggregate(start, [update], mode), aggregate(start, plain, mode),
                                   atol=1e-5, rtol=0)


# ----------------------------------------------------------------------- protocol rounds
def test_secagg_round_equals_the_plain_sum():
    strategy = _strategy(SecAggSettings())
    start = strategy.server.table.clone()
    grid = LocalGrid(_deltas(strategy))
    updates = _round(strategy, grid)
    assert updates is not None and len(updates) == 1  # one synthetic update: the sum
    _check_sum(strategy, updates[0], list(grid.trained.values()), start)
    assert len(grid.trained) == len(NODES)
    # what the server kept is the sum: no node's masked vector decodes to its own update
    row = strategy.secure.row(1)
    assert set(row) == {"secagg-bytes-down", "secagg-bytes-up", "secagg-seconds"}
    stages = strategy.secure.history[-1]["stages"]
    assert list(stages) == ["setup", "share-keys", "train", "unmask"]
    assert all(s["messages"] == s["replies"] == len(NODES) for s in stages.values())
    assert row["secagg-bytes-up"] >= len(NODES) * (NUM_ITEMS * DIM + NUM_ITEMS + 2) * 8
    assert strategy.rejected == []


@pytest.mark.parametrize("stage", [protocol.SECAGG_SHARE_KEYS, protocol.SECAGG_TRAIN,
                                   protocol.SECAGG_UNMASK])
def test_a_node_that_drops_out_leaves_the_survivors_sum(stage):
    """Dropped before its shares were sealed, after them (its pairwise masks are removed
    through its rebuilt key), or silent only when unmasking (its own update still counts)."""
    strategy = _strategy(SecAggSettings())
    start = strategy.server.table.clone()
    gone = NODES[2]
    grid = LocalGrid(_deltas(strategy, 1), {stage: {gone}})
    updates = _round(strategy, grid)
    assert updates is not None
    counted = [u for n, u in grid.trained.items() if n != gone or stage == protocol.SECAGG_UNMASK]
    assert len(counted) == len(NODES) - (stage != protocol.SECAGG_UNMASK)
    _check_sum(strategy, updates[0], counted, start)
    assert strategy.secure.history[-1]["dropped"] == (stage == protocol.SECAGG_TRAIN)


def test_a_malformed_masked_reply_counts_as_a_dropout():
    strategy = _strategy(SecAggSettings())
    start = strategy.server.table.clone()
    grid = LocalGrid(_deltas(strategy, 2))
    messages = strategy.train_messages(1, grid)
    replies = grid.send_and_receive(messages)
    bad = next(r for r in replies if r.metadata.src_node_id == NODES[0])
    bad.content["arrays"]["masked-vector"] = protocol._ints(np.zeros(3))
    updates = strategy.accepted_updates(1, replies)
    assert updates is not None
    _check_sum(strategy, updates[0], [u for n, u in grid.trained.items() if n != NODES[0]],
               start)
    assert [r["node"] for r in strategy.rejected] == [NODES[0]]


def test_fewer_survivors_than_the_threshold_change_nothing():
    strategy = _strategy(SecAggSettings(num_shares=5, threshold=3))
    start = strategy.server.table.clone()
    grid = LocalGrid(_deltas(strategy, 3), {protocol.SECAGG_TRAIN: set(NODES[:3])})
    updates = _round(strategy, grid)
    assert updates is None  # the learning round then keeps the table as it was
    assert "2 nodes answered" in strategy.secure.history[-1]["failed"]
    assert torch.equal(strategy.learning(1, updates), start)


def test_a_node_out_of_step_is_refused():
    """A train.secagg message that did not follow this node's key exchange raises (Flower then
    replies with an error, and the server counts the node as dropped)."""
    strategy = _strategy(SecAggSettings())
    grid = LocalGrid(_deltas(strategy))
    messages = strategy.train_messages(1, grid)
    message = message_from_proto(message_to_proto(messages[0]))
    with pytest.raises(ValueError, match="SecAgg: round 1 needs stage shared"):
        secagg.masked_train(message, Context(1, 1, {}, RecordDict(), {}), lambda r: None)


def _reply(config: dict | None = None, arrays: dict | None = None) -> RecordDict:
    from flwr.app import Array, ArrayRecord, ConfigRecord

    content = RecordDict({"config": ConfigRecord(config or {})})
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return content


@pytest.mark.parametrize(("read", "content"), [
    (lambda c: protocol.read_secagg_setup_reply(c),
     _reply({"mask-key": b"k", "share-key": "not bytes"})),
    (lambda c: protocol.read_secagg_share_keys_reply(c, [2, 3]),
     _reply({"destinations": [2, 4], "ciphertexts": [b"a", b"b"]})),  # 4 is no neighbour
    (lambda c: protocol.read_secagg_share_keys_reply(c, [2, 3]),
     _reply({"destinations": [2, 2], "ciphertexts": [b"a", b"b"]})),
    (lambda c: protocol.read_secagg_train_reply(c, 3, 2**62),
     _reply(arrays={"masked-vector": np.array([1, 2, 2**62])})),  # outside the modulus
    (lambda c: protocol.read_secagg_train_reply(c, 3, 2**62),
     _reply(arrays={"masked-vector": np.array([1.0, 2.0, 3.0])})),
    (lambda c: protocol.read_secagg_unmask_reply(c, [2, 3]),
     _reply({"owners": [2, 5], "shares": [b"a", b"b"]})),  # 5 was not asked for
    (lambda c: protocol.read_secagg_unmask_reply(c, [2, 3]),
     _reply({"owners": [2, 3], "shares": [b"a"]})),
])
def test_readers_refuse_malformed_replies(read, content):
    with pytest.raises(ValueError):
        read(content)


# ------------------------------------------------------------------------ run config
def test_defaults_match_pyproject():
    table = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert table["defence"] == DEFAULT_DEFENCE == "secagg+hidden"
    assert {k: table[k] for k in SECAGG_KEYS} == SecAggSettings().to_run_config()
    assert secagg_settings(table) == SecAggSettings()
    assert upload_defence(table) == UploadDefence(("secagg", "hidden"))


def test_defence_parsing():
    assert parse_defences("none") == parse_defences("") == ()
    assert parse_defences(" secagg ") == ("secagg",)
    assert secagg_settings({"defence": "none", "unlearning": "cufru"}) is None
    assert secagg_settings({"unlearning": "cufru"}, default="none") is None
    assert upload_defence({"defence": "non-marking", "decoy-rows": 64}).decoy_rows == 64
    for bad in ({"defence": "hidden", "unlearning": "cufru"},
                {"defence": "hidden", "fru-alpha": 0.5}, {"defence": "ldp", "ldp-clip": "x"}):
        with pytest.raises(FedShareError):
            upload_defence(bad)


@pytest.mark.parametrize(("run_config", "match"), [
    ({"defence": "secagg+bogus"}, "unknown defence 'bogus'"),
    ({"defence": "secagg+secagg"}, "names one defence twice"),
    ({"defence": "secagg", "unlearning": "cufru"}, "unlearning=cufru"),
    ({"unlearning": "cufru"}, "unlearning=cufru"),  # the default defence
    ({"defence": "secagg", "fru-alpha": 0.5}, "FRU"),
    ({"defence": "secagg", "unlearning": "fru"}, "FRU"),
    ({"secagg-num-shares": 4}, "odd"),
    ({"secagg-threshold": 1}, "more than half"),
    ({"secagg-clip": 0.0}, "positive"),
    ({"secagg-quantization-bits": 31}, r"\[1, 30\]"),
    ({"secagg-modulus-bits": 63}, "at most 62"),
])
def test_bad_settings_are_one_line_errors(run_config, match):
    with pytest.raises(FedShareError, match=match) as error:
        secagg_settings(run_config)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("sets", [["defence=bogus"], ["defence=secagg", "unlearning=cufru"],
                                  ["unlearning=cufru"]])
def test_the_cli_refuses_in_one_line_before_a_flower_run(sets, tmp_path, capsys):
    from simulations.cli import main

    folder = tiny_prepared().save(tmp_path / "tiny")
    args = [a for s in [*sets, f"prepared={folder}", "unlearn=true"] for a in ("--set", s)]
    assert main(["run", *args, "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedshare: error: ")
    assert not (tmp_path / "runs").exists()  # refused before any folder or process


# ---------------------------------------------------------------------- Flower simulation
def test_a_flower_run_with_secagg_equals_the_inprocess_engine(tmp_path):
    """Five SuperNodes of two users each (a round's nodes sit on a ring of neighbourhoods of
    3), learning and then unlearning (its remaining-data rounds are summed securely too): the
    final table equals the in-process engine's within the quantisation bound, the learning
    rounds' rows show SecAgg's bytes, and no train reply carried anything but a masked
    vector."""
    from simulations.experiment import resolve, run_experiment

    folder = tiny_prepared().save(tmp_path / "tiny")
    audit = tmp_path / "audit"
    settings = [f"prepared={folder}", "rounds=2", "eval-every=2", "fraction=0.5", "dim=8",
                "server-steps=2", "local-epochs=2", "seed=0", "num-supernodes=5", "snapshots=2",
                "unlearn=true", "unlearn-rounds=2", "unlearn-steps=2"]
    # every client-side defence path at once: devices sample themselves (hidden) and add LDP
    # noise on their private streams, then the node's update is summed securely; the
    # in-process engine applies the same defence and sums in the clear
    defence = ["defence=secagg+hidden+ldp", "ldp-noise=0.01"]
    out, summary = run_experiment(resolve(None, [*settings, *defence, f"audit-dir={audit}"],
                                          name="secagg"), tmp_path / "runs", "flower")
    ref, reference = run_experiment(resolve(None, [*settings, *defence], name="plain"),
                                    tmp_path / "runs", "inprocess")
    table, expected = np.load(out / "item_table.npy"), np.load(ref / "item_table.npy")
    np.testing.assert_allclose(table, expected, atol=1e-5, rtol=0)
    for part in ("valid", "test"):
        for key, value in reference[part].items():
            assert summary[part][key] == pytest.approx(value, abs=1e-5)
    metrics = pd.read_csv(out / "metrics.csv")
    assert (metrics["secagg-bytes-down"] > 0).all() and (metrics["secagg-bytes-up"] > 0).all()
    assert (metrics["secagg-seconds"] > 0).all()
    costs = json.loads((out / "secagg.json").read_text())
    assert [r["round"] for r in costs["rounds"]] == [1, 2, 3, 4]  # learning, then unlearning
    assert all(r["survivors"] == r["nodes"] >= 3 and r["dropped"] == 0 for r in costs["rounds"])
    assert summary["unshare_requests"] > 0
    print("\nSecAgg+ per round:", metrics[["round", "num-users", "train-seconds",
                                          "secagg-bytes-down", "secagg-bytes-up",
                                          "secagg-seconds"]].to_string(index=False))
    print(json.dumps(costs["rounds"], indent=1))
    kinds = set()
    for path in audit.glob("*.npz"):
        kind = path.stem.split("-", 1)[1].rsplit("-r", 1)[0]
        kinds.add(kind)
        with np.load(path) as arrays:
            if kind == "secagg-train":  # the update went up masked, and nothing else of it
                assert arrays.files == ["arrays/masked-vector"]
                assert arrays["arrays/masked-vector"].dtype == np.int64
            elif kind.startswith("secagg"):  # keys and shares are config bytes
                assert arrays.files == []
    assert {"share", "secagg-setup", "secagg-share-keys", "secagg-train",
            "secagg-unmask"} <= kinds and "train" not in kinds
