"""What an unlearning method costs on the wire: client messages, bytes each way, devices online.

Storage is one cost of federated unlearning; the other is who must take part. FRU's replay needs
every participant of every replayed round online; CUFRU only those of its calibration rounds;
FedShare those sampled in its T_un remaining-data rounds; Retrain every user the learning phase
samples again. :class:`Traffic` counts it per method, in both engines:

- a *client message* is one request to one device and its reply;
- *bytes down / up* are the array bytes of the request / reply (the item table, an update, the
  stored rows a device sends back), as :mod:`fedshare.protocol` encodes them; config values
  (round numbers, user ids) are left out;
- *devices online* are the distinct users whose device had to answer.

The in-process engine counts as if every user were its own device (one message per user and
round, with the sizes below; a test checks them against the protocol's real encodings). Through
Flower the strategy counts the messages it really sent: a cohort node serving many users sends
one message for all of them, so Flower's message and byte counts are per node, while devices
online still count users. The unsharing requests themselves (one query per device, the same
for every method) are not counted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

FLOAT, ID = 4, 8  # float32 rows and weights; int64 item ids (protocol encodings)


def table_bytes(num_items: int, dim: int) -> int:
    """The item table V_s a train request carries."""
    return num_items * dim * FLOAT


def update_bytes(num_items: int, dim: int) -> int:
    """A train reply: the uploaded table and its per-row weights (for row-wise averaging)."""
    return num_items * dim * FLOAT + num_items * FLOAT


def stored_rows_bytes(rows: int, dim: int) -> int:
    """FRU's stored rows sent back in a replayed round: item ids, the weighted rows and the
    weight behind each row."""
    return rows * (ID + dim * FLOAT + FLOAT)


def sparse_update_bytes(rows: int, dim: int) -> int:
    """CUFRU's per-sharer upload while learning: the rows a user's training touched, with
    their item ids (and the user's row count)."""
    return rows * (ID + dim * FLOAT) + 2 * ID


@dataclass
class Traffic:
    """Running totals of one method's unlearning (module docstring)."""

    messages: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    devices: set[int] = field(default_factory=set)

    def add(self, users: Iterable[int], down: int, up: int, messages: int = 1) -> None:
        """``messages`` request/reply pairs that reached ``users`` with ``down`` and ``up``
        bytes in all."""
        self.messages += messages
        self.bytes_down += down
        self.bytes_up += up
        self.devices.update(int(u) for u in users)

    def per_device(self, users: Iterable[int], down: int, up: int) -> None:
        """One message to each of ``users``, each carrying ``down`` and answering ``up``."""
        users = [int(u) for u in users]
        self.add(users, down * len(users), up * len(users), len(users))

    def to_dict(self) -> dict[str, int]:
        return {"client_messages": self.messages, "bytes_down": self.bytes_down,
                "bytes_up": self.bytes_up, "devices_online": len(self.devices)}
