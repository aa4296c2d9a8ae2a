"""What one user's device holds in a deployment: its own interactions and sharing choices.

A deployed SuperNode never sees the dataset. Its node config names a device file, a small JSON
document the user (or an enrolment step) writes::

    {"format": "fedshare-device/1", "user": 7, "num_users": 943, "num_items": 1682,
     "train": {"local": [...], "shared": [...], "unshare": [...]},
     "valid": [...], "test": [...]}

``local`` items never leave the device; ``shared`` items are announced to the server; ``unshare``
items were shared and the user takes them back: the device announces them as shared in the
share round and as unsharing requests when the server asks (Sec. III-B, Eq. 8-9). ``user``
is the global id the federation enrolled this device under, and the catalogue sizes let the
device build tables of the federation's shape.

Choices: JSON so a person can read and edit what their device shares; files are written beside
their final name and renamed, so a crash never leaves half a file; a bad file is one clear
:class:`FedShareError` naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedshare.atomic import write_json
from fedshare.data.interactions import Interactions
from fedshare.data.prepared import PreparedData
from fedshare.data.sharing import NONE, SharingConfig, SharingPlan
from fedshare.data.split import Split
from fedshare.errors import FedShareError

FORMAT = "fedshare-device/1"
LOCAL, SHARED, UNSHARE = "local", "shared", "unshare"


@dataclass(frozen=True)
class DeviceData:
    """One user's data on their device (module docstring)."""

    user: int
    num_users: int
    num_items: int
    local: np.ndarray
    shared: np.ndarray
    unshare: np.ndarray
    valid: np.ndarray
    test: np.ndarray

    @classmethod
    def from_prepared(cls, data: PreparedData, user: int) -> DeviceData:
        """The part of ``data`` that belongs to ``user``, with its sharing plan."""
        train, plan = data.split.train, data.plan
        mine = train.users == user

        def items(mask: np.ndarray) -> np.ndarray:
            return np.sort(train.items[mine & mask])

        def held(part: Interactions) -> np.ndarray:
            return np.sort(part.items[part.users == user])

        return cls(int(user), data.num_users, data.num_items, items(~plan.shared),
                   items(plan.shared & ~plan.unlearn), items(plan.unlearn),
                   held(data.split.valid), held(data.split.test))

    def prepared(self) -> PreparedData:
        """A :class:`PreparedData` holding only this device's rows (what a ClientApp needs)."""
        train_items = np.concatenate([self.local, self.shared, self.unshare])
        shared = np.repeat([False, True, True], [len(self.local), len(self.shared),
                                                  len(self.unshare)])
        unlearn = np.repeat([False, False, True], [len(self.local), len(self.shared),
                                                    len(self.unshare)])

        def part(items: np.ndarray) -> Interactions:
            return Interactions.from_arrays(np.full(len(items), self.user, np.int64), items,
                                            self.num_users, self.num_items)

        group = np.full(self.num_users, NONE, dtype=np.int8)  # other users: nothing known
        plan = SharingPlan(SharingConfig(), group, shared, unlearn)
        split = Split(part(train_items), part(self.valid), part(self.test))
        return PreparedData(f"device-{self.user}", split, plan, 0, (0.8, 0.1, 0.1))

    def to_json(self) -> dict:
        return {"format": FORMAT, "user": self.user, "num_users": self.num_users,
                "num_items": self.num_items,
                "train": {LOCAL: self.local.tolist(), SHARED: self.shared.tolist(),
                          UNSHARE: self.unshare.tolist()},
                "valid": self.valid.tolist(), "test": self.test.tolist()}

    def save(self, path: str | Path) -> Path:
        """Write the file atomically (beside it, then renamed)."""
        write_json(Path(path), self.to_json())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> DeviceData:
        try:
            document = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FedShareError(f"device file {path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FedShareError(f"device file {path} is not readable JSON ({exc})") from None
        try:
            return cls.from_json(document)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise FedShareError(f"device file {path} is malformed: {exc}") from None

    @classmethod
    def from_json(cls, document: dict) -> DeviceData:
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} document")
        user, num_users, num_items = (_integer(document[k], k)
                                      for k in ("user", "num_users", "num_items"))
        if not 0 <= user < num_users:
            raise ValueError(f"user {user} outside [0, {num_users})")
        train = document["train"]
        lists = [train[LOCAL], train[SHARED], train[UNSHARE], document["valid"],
                 document["test"]]
        arrays = [_items(values, num_items) for values in lists]
        train_items = np.concatenate(arrays[:3])
        if len(np.unique(train_items)) != len(train_items):
            raise ValueError("an item is listed twice in train")
        return cls(user, num_users, num_items, *arrays)


def _integer(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def _items(values: object, num_items: int) -> np.ndarray:
    if not isinstance(values, list):
        raise ValueError("item lists must be JSON arrays")
    items = np.array([_integer(v, "an item") for v in values], dtype=np.int64)
    if (items >= num_items).any():
        raise ValueError(f"item {int(items.max())} outside the catalogue of {num_items}")
    return np.sort(items)


def write_device_files(data: PreparedData, users: np.ndarray, directory: str | Path
                       ) -> list[Path]:
    """One device file per user, ``user-<id>.json`` in ``directory``; returns the paths."""
    directory = Path(directory)
    return [DeviceData.from_prepared(data, int(u)).save(directory / f"user-{int(u)}.json")
            for u in users]


def pick_device_users(data: PreparedData, count: int) -> np.ndarray:
    """``count`` users for a small deployment: half of them (rounded up) among the users who
    will unshare, so the unlearning phase has requests to serve, the rest among the others;
    lowest ids first, so the choice is repeatable."""
    if count < 1 or count > data.num_users:
        raise FedShareError(f"a deployment needs 1 to {data.num_users} devices, got {count}")
    unsharing = data.plan.unsharing_users(data.split.train)
    others = np.setdiff1d(np.arange(data.num_users), unsharing)
    first = unsharing[:min(len(unsharing), (count + 1) // 2)]
    return np.sort(np.concatenate([first, others[:count - len(first)]]))
