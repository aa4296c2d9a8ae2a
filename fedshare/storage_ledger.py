"""One storage ledger that every store of a run writes to, so reported bytes are bytes held.

A store (the server's snapshots, a client's update history, a checkpoint) reports what it holds
under an owner (``"server"``, or ``"client:<user>"``) and a kind (``"snapshots"``, ...). The ledger
keeps the current bytes and the peak of each entry; the storage study reads it per client and in
total instead of computing sizes from formulas (tests compare the two).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterator

import pandas as pd
import torch
from torch import Tensor

SERVER = "server"
FRU_CLIENT = "fru-updates"
"""Kind of FRU's client-side update stores: reported by the nodes that hold them, in Flower runs
through their train replies (:class:`fedshare.federated.validation.ReplyChecks`)."""


def tensor_bytes(*tensors: Tensor) -> int:
    """Bytes of the tensors' elements (what a store holds, without Python overhead)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def client(user: int) -> str:
    return f"client:{user}"


class StorageLedger:
    """Current and peak bytes per (owner, kind)."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, str], int] = {}
        self._peak: dict[tuple[str, str], int] = {}

    def set(self, owner: str, kind: str, nbytes: int) -> None:
        """Record that ``owner`` now holds ``nbytes`` of ``kind``."""
        if nbytes < 0:
            raise ValueError("a store cannot hold negative bytes")
        key = (owner, kind)
        self._held[key] = nbytes
        self._peak[key] = max(self._peak.get(key, 0), nbytes)

    def held(self, owner: str | None = None, kind: str | None = None) -> int:
        """Bytes held now, over the entries matching ``owner`` / ``kind`` (``None`` = any)."""
        return sum(b for (o, k), b in self._held.items()
                   if (owner is None or o == owner) and (kind is None or k == kind))

    def peak(self, owner: str | None = None, kind: str | None = None) -> int:
        """Sum of the per-entry peaks matching ``owner`` / ``kind``."""
        return sum(b for (o, k), b in self._peak.items()
                   if (owner is None or o == owner) and (kind is None or k == kind))

    def client_held(self) -> int:
        return sum(b for (o, _), b in self._held.items() if o.startswith("client:"))

    def frame(self) -> pd.DataFrame:
        rows = [{"owner": o, "kind": k, "bytes": b, "peak_bytes": self._peak[(o, k)]}
                for (o, k), b in sorted(self._held.items())]
        return pd.DataFrame(rows, columns=["owner", "kind", "bytes", "peak_bytes"])


class SnapshotStore:
    """The server's last M global item tables (Sec. IV-D2), accounted in a ledger."""

    def __init__(self, capacity: int, ledger: StorageLedger | None = None,
                 owner: str = SERVER, kind: str = "snapshots") -> None:
        self._tables: deque[Tensor] = deque(maxlen=max(capacity, 1))
        self.ledger = ledger if ledger is not None else StorageLedger()
        self._owner, self._kind = owner, kind
        self._report()

    def _report(self) -> None:
        self.ledger.set(self._owner, self._kind, self.nbytes)

    @property
    def nbytes(self) -> int:
        return tensor_bytes(*self._tables)

    def append(self, table: Tensor) -> None:
        self._tables.append(table.detach().clone())
        self._report()

    def clear(self) -> None:
        self._tables.clear()
        self._report()

    def keep_last(self, count: int) -> None:
        """Keep only the newest ``count`` tables from now on (a smaller M)."""
        if count < 1:
            raise ValueError(f"M must be at least 1, got {count}")
        self._tables = deque(list(self._tables)[-count:], maxlen=count)
        self._report()

    def __len__(self) -> int:
        return len(self._tables)

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self._tables)

    def __getitem__(self, index: int) -> Tensor:
        return self._tables[index]

    def stacked(self) -> Tensor:
        return torch.stack(list(self._tables))


class RowStore:
    """Sparse per-round records (e.g. a client's update rows of round t), accounted in a ledger.

    Every record is a tuple of tensors under a key (a round, or a (round, user) pair); adding to
    an existing key concatenates along the first dimension (several cohorts in one round).
    """

    def __init__(self, owner: str, kind: str, ledger: StorageLedger) -> None:
        self.owner, self.kind, self.ledger = owner, kind, ledger
        self._records: dict[Hashable, tuple[Tensor, ...]] = {}
        self._nbytes = 0
        self._report()

    def _report(self) -> None:
        self.ledger.set(self.owner, self.kind, self._nbytes)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def add(self, key: Hashable, *tensors: Tensor) -> None:
        new = tuple(t.detach().clone() for t in tensors)
        if key in self._records:
            old = self._records[key]
            new = tuple(torch.cat([a, b]) for a, b in zip(old, new, strict=True))
            self._nbytes -= tensor_bytes(*old)
        self._records[key] = new
        self._nbytes += tensor_bytes(*new)
        self._report()

    def put(self, key: Hashable, *tensors: Tensor) -> None:
        """Replace the record under ``key``."""
        if key in self._records:
            self._nbytes -= tensor_bytes(*self._records.pop(key))
        self.add(key, *tensors)

    def get(self, key: Hashable) -> tuple[Tensor, ...] | None:
        return self._records.get(key)

    def keys(self) -> list:
        return sorted(self._records)

    def drop(self) -> None:
        """Forget everything (the owner leaves, or the store has served)."""
        self._records.clear()
        self._nbytes = 0
        self._report()
