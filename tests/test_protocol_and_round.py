"""The wire format reads back what it writes, and the one learning round both engines run
behaves the same whatever delivers the updates (a failed round changes nothing but is logged and
committed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedshare import protocol
from fedshare.federated.config import FederatedConfig
from fedshare.federated.population import NodeUpdate
from fedshare.federated.recording import RoundRecorder
from fedshare.federated.rounds import (
    LearningRound,
    RunLog,
    is_eval_round,
    progress_line,
    sample_users,
)
from fedshare.federated.traffic import (
    sparse_update_bytes,
    stored_rows_bytes,
    table_bytes,
    update_bytes,
)

NUM_ITEMS, DIM = 6, 3


@pytest.fixture(autouse=True)
def _task(monkeypatch):
    """Flower stamps messages with the run and node of the process (set by a running app)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def test_share_reply_reads_back():
    request = protocol.share_request(7)
    assert request.metadata.message_type == protocol.SHARE
    reply = protocol.share_reply(request, np.array([3, 4]), np.array([5, 0]), np.array([3, 3]),
                                 np.array([1, 2]), (10, NUM_ITEMS))
    read = protocol.read_share_reply(reply)  # a reply comes from the node asked
    assert read.node == 7 and read.catalogue == (10, NUM_ITEMS)
    assert read.served.tolist() == [3, 4] and read.counts.tolist() == [5, 0]
    assert read.users.tolist() == [3, 3] and read.items.tolist() == [1, 2]


def test_train_messages_share_one_model_record_and_read_back():
    table = torch.arange(NUM_ITEMS * DIM, dtype=torch.float32).reshape(NUM_ITEMS, DIM)
    mark = protocol.RunMark("key", 3)
    messages = protocol.train_requests(4, {1: [0, 2], 2: [5]}, table, mark, local_epochs=1)
    assert [m.metadata.dst_node_id for m in messages] == [1, 2]
    assert messages[0].content["arrays"] is messages[1].content["arrays"]  # built once a round
    request = protocol.read_train_request(messages[0])
    assert (request.round, request.users.tolist(), request.mark, request.local_epochs) == \
        (4, [0, 2], mark, 1)
    assert torch.equal(request.table, table)
    plain = protocol.read_train_request(protocol.train_requests(1, {3: [1]}, table,
                                                                protocol.RunMark())[0])
    assert plain.local_epochs is None


def test_train_reply_reads_back_with_its_fru_report():
    update = NodeUpdate(torch.ones(NUM_ITEMS, DIM), 6.0, torch.full((NUM_ITEMS,), 2.0), 2)
    request = protocol.train_requests(1, {1: [0, 2]}, torch.zeros(NUM_ITEMS, DIM),
                                      protocol.RunMark())[0]
    reply = protocol.train_reply(request, update, {0: 136, 2: 8})
    read, fru = protocol.read_train_reply(reply.content, [0, 2])
    assert torch.equal(read.table, update.table) and torch.equal(read.row_weight,
                                                                 update.row_weight)
    assert (read.weight, read.num_users) == (6.0, 2) and fru == [(0, 136), (2, 8)]
    with pytest.raises(ValueError, match="FRU store report"):
        protocol.read_train_reply(reply.content, [0])  # user 2 was not asked
    bare = protocol.train_reply(request, update, {})
    assert protocol.read_train_reply(bare.content, [0, 2])[1] == []


def test_evaluate_reply_carries_sums_and_counts_per_part():
    request = protocol.evaluate_requests([4], torch.zeros(NUM_ITEMS, DIM), ("valid", "test"),
                                         protocol.RunMark("k", 0))[0]
    read = protocol.read_evaluate_request(request)
    assert read.parts == ("valid", "test") and read.mark == protocol.RunMark("k", 0)
    reply = protocol.evaluate_reply(request, {"valid": ({"hr@20": 2.0}, 3),
                                              "test": ({"hr@20": 1.0}, 2)})
    assert protocol.read_evaluate_reply(reply.content, ("valid", "test")) == {
        "valid": ({"hr@20": 2.0}, 3), "test": ({"hr@20": 1.0}, 2)}
    with pytest.raises(ValueError, match="not asked"):
        protocol.read_evaluate_reply(reply.content, ("valid",))


def test_unshare_reply_reads_back_and_refuses_ragged_arrays():
    request = protocol.unshare_request(3, protocol.RunMark("key", 7))
    assert protocol.run_mark(request) == protocol.RunMark("key", 7)
    reply = protocol.unshare_reply(request, np.array([1, 1]), np.array([4, 5]))
    users, items = protocol.read_unshare_reply(reply.content)
    assert users.tolist() == [1, 1] and items.tolist() == [4, 5]
    ragged = protocol.unshare_reply(request, np.array([1]), np.array([4, 5]))
    with pytest.raises(ValueError):
        protocol.read_unshare_reply(ragged.content)
    with pytest.raises(KeyError):
        protocol.read_unshare_reply(RecordDict({}))


class _Model:
    """A model that averages updates by weight and adds 1 in its server step."""

    def __init__(self, extra: NodeUpdate | None = None) -> None:
        self.table = torch.zeros(NUM_ITEMS, DIM)
        self.extra = extra

    def server_client_update(self, round_: int) -> NodeUpdate | None:
        return self.extra

    def aggregate(self, updates):
        total = sum(u.weight for u in updates)
        return sum(u.weight * u.table for u in updates) / total

    def finish_round(self, local_view, round_):
        self.table = local_view + 1
        return self.table


class _Hook(RoundRecorder):
    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def refined(self, round_, aggregated, refined):
        self.seen.append(("refined", round_))

    def committed(self, round_, table):
        self.seen.append(("committed", round_))


def _update(value: float, weight: float, users: int = 1) -> NodeUpdate:
    return NodeUpdate(torch.full((NUM_ITEMS, DIM), value), weight,
                      torch.full((NUM_ITEMS,), weight), users)


def test_a_round_aggregates_steps_hooks_and_logs():
    model, hook, rows = _Model(extra=_update(4.0, 2.0)), _Hook(), []
    learning = LearningRound(model, (hook,), RunLog(rows.append))
    table = learning(3, [_update(1.0, 1.0), _update(2.0, 1.0, users=2)], train_seconds=0.5)
    assert torch.equal(table, torch.full((NUM_ITEMS, DIM), (1 + 2 + 8) / 4 + 1))  # + server's
    assert hook.seen == [("refined", 3), ("committed", 3)]
    (row,) = learning.log.rounds
    assert (row["round"], row["num-users"], row["num-examples"], row["train-seconds"]) == \
        (3, 4, 4.0, 0.5)
    learning.log.validation(3, {"hr@20": 0.5, "ndcg@20": 0.25})
    assert rows == learning.log.validations
    assert progress_line(rows[0]).startswith("round 3 ")
    assert "valid HR@20 0.5000  NDCG@20 0.2500" in progress_line(rows[0])


def test_a_failed_round_changes_nothing_but_is_committed_and_logged():
    model, hook = _Model(), _Hook()
    learning = LearningRound(model, (hook,))
    before = model.table.clone()
    assert torch.equal(learning(1, None), before)
    assert hook.seen == [("committed", 1)]
    assert learning.log.rounds[0]["num-users"] == 0


def test_one_evaluation_schedule_and_one_sample_per_round():
    config = FederatedConfig(rounds=7, eval_every=3)
    assert [r for r in range(1, 8) if is_eval_round(r, config)] == [3, 6, 7]
    candidates = np.arange(20)
    first = sample_users(candidates, 0.25, 0, 1)
    assert len(first) == 5 and np.array_equal(first, sample_users(candidates, 0.25, 0, 1))
    assert not np.array_equal(first, sample_users(candidates, 0.25, 0, 2))


def test_traffic_sizes_equal_the_protocol_encodings():
    """The in-process engine counts bytes with these formulas; Flower sends these arrays."""
    table = torch.randn(NUM_ITEMS, DIM)
    (request,) = protocol.train_requests(3, {7: [1, 2]}, table, protocol.RunMark())
    assert protocol.array_bytes(request.content) == table_bytes(NUM_ITEMS, DIM)
    update = NodeUpdate(table, 5.0, torch.ones(NUM_ITEMS), 2)
    reply = protocol.train_reply(request, update, {})
    assert protocol.array_bytes(reply.content) == update_bytes(NUM_ITEMS, DIM)
    rows = protocol.stored_rows_record(torch.arange(5), torch.randn(5, DIM), torch.ones(5))
    assert sum(a.numpy().nbytes for a in rows.values()) == stored_rows_bytes(5, DIM)
    sparse = protocol.sparse_updates_record([(1, torch.arange(3), torch.randn(3, DIM)),
                                             (2, torch.arange(4), torch.randn(4, DIM))])
    assert sum(a.numpy().nbytes for a in sparse.values()) == \
        sparse_update_bytes(3, DIM) + sparse_update_bytes(4, DIM)


def test_fru_replay_messages_read_back_and_refuse_what_does_not_fit():
    mark = protocol.RunMark("key", 3)
    (query,) = protocol.stored_rows_requests(2, {5: [0, 4]}, {0: 3.0, 4: 7.0}, mark)
    asked = protocol.read_stored_rows_request(query)
    assert (asked.round, asked.users.tolist(), asked.weights.tolist()) == (2, [0, 4], [3.0, 7.0])
    (train,) = protocol.replay_train_requests(9, 2, {5: [4]}, {4: 7.0},
                                              torch.zeros(NUM_ITEMS, DIM), mark, 1, True)
    request = protocol.read_train_request(train)
    assert (request.round, request.local_epochs, request.replay.round) == (9, 1, 2)
    assert request.replay.weights.tolist() == [7.0]
    sums = torch.randn(2, DIM)
    reply = protocol.stored_rows_reply(query, torch.tensor([1, 3]), sums, torch.tensor([3., 7.]))
    items, read, weights = protocol.read_stored_rows(reply.content, NUM_ITEMS, DIM)
    assert items.tolist() == [1, 3] and torch.equal(read, sums)
    assert weights.tolist() == [3.0, 7.0]
    with pytest.raises(ValueError, match="catalogue"):
        protocol.read_stored_rows(reply.content, 3, DIM)  # item 3 outside a 3-item catalogue


def test_sparse_updates_read_back_only_for_users_asked():
    from flwr.app import RecordDict

    rows = [(1, torch.tensor([0, 2]), torch.randn(2, DIM)), (4, torch.tensor([5]),
                                                             torch.randn(1, DIM))]
    content = RecordDict({"arrays": protocol.sparse_updates_record(rows)})
    read = protocol.read_sparse_updates(content, [1, 4], NUM_ITEMS, DIM)
    assert [(u, i.tolist()) for u, i, _ in read] == [(1, [0, 2]), (4, [5])]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(read, rows, strict=True))
    with pytest.raises(ValueError, match="users asked"):
        protocol.read_sparse_updates(content, [1], NUM_ITEMS, DIM)
