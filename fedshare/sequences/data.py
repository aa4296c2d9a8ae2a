"""Sessions from interactions (CAU paper Sec. 5.1.1), saved and fingerprinted like plans.

- Filter: users and items with fewer than ``min_count`` (5) interactions are removed. The paper
  says only "filter out users and items with fewer than 5 interactions" (after [41], BERT4Rec);
  one pass can leave users or items below 5 (removing an item shortens its users' sessions), so
  the filter is repeated until nothing changes: every remaining user and item has >= 5.
- Session: a user's interactions sorted by timestamp, ties kept in the input order (stable sort).
- Item ids are remapped to ``1..n`` in the order of the input's item ids; 0 is the pad id.
- Split: sessions, not interactions, are split 8:1:1 by a seeded permutation, so a session (a
  device) is wholly a training, validation or test device.
- Sessions are stored whole; :meth:`SequenceData.windows` cuts the model's input: the last
  ``max_len + 1`` items, so that the input is the most recent ``max_len`` items (the paper's "the
  most recent 50 interacted items" for MovieLens, Sec. 5.1.4) and each position predicts the next.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedshare.atomic import read_data_folder, write_data_folder
from fedshare.data.dataset import load_dataset
from fedshare.data.interactions import Interactions
from fedshare.errors import FedShareError

PAD = 0
TRAIN, VALID, TEST = 0, 1, 2
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SequenceData:
    """Sessions in CSR form: session ``s`` is ``items[indptr[s]:indptr[s + 1]]`` (ids 1..n).

    ``users[s]`` is the session's user in the source interactions' id space and ``item_ids[k - 1]``
    the source item id of sequence item ``k``; ``part[s]`` is TRAIN, VALID or TEST.
    """

    dataset: str
    indptr: np.ndarray
    items: np.ndarray
    part: np.ndarray
    users: np.ndarray
    item_ids: np.ndarray
    max_len: int
    split_seed: int
    split_fractions: tuple[float, float, float]
    min_count: int

    @property
    def num_items(self) -> int:
        """n; the embedding tables have ``n + 1`` rows (row 0 is the pad)."""
        return len(self.item_ids)

    @property
    def num_sessions(self) -> int:
        return len(self.indptr) - 1

    def session(self, s: int) -> np.ndarray:
        return self.items[self.indptr[s]:self.indptr[s + 1]]

    def sessions(self, part: int | None = None) -> list[np.ndarray]:
        """The sessions of one part (all when ``part`` is None), in session order."""
        ids = range(self.num_sessions) if part is None else np.flatnonzero(self.part == part)
        return [self.session(int(s)) for s in ids]

    def windows(self, part: int | None = None) -> np.ndarray:
        """``[S, max_len + 1]`` left-padded last items of each session of ``part``."""
        return pad_sessions(self.sessions(part), self.max_len + 1)

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for array in (self.indptr, self.items, self.part):
            digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
            digest.update(b"|")
        return digest.hexdigest()[:16]

    def save(self, folder: str | Path) -> Path:
        """Write ``meta.json`` and ``sessions.npz``; the folder appears only when complete."""
        arrays = {"indptr": self.indptr, "items": self.items, "part": self.part,
                  "users": self.users, "item_ids": self.item_ids}
        meta = {"format": FORMAT_VERSION, "kind": "sequences", "dataset": self.dataset,
                "num_items": self.num_items, "num_sessions": self.num_sessions,
                "max_len": self.max_len, "split_seed": self.split_seed,
                "split_fractions": list(self.split_fractions), "min_count": self.min_count,
                "fingerprint": self.fingerprint()}
        return write_data_folder(Path(folder), "sessions.npz", arrays, meta)

    @classmethod
    def load(cls, folder: str | Path) -> SequenceData:
        folder = Path(folder)
        meta, arrays = read_data_folder(folder, "sessions.npz", "sequence-data")
        if meta.get("kind") != "sequences":
            raise FedShareError(f"{folder}/meta.json does not describe sequence data")
        if meta.get("format") != FORMAT_VERSION:
            raise FedShareError(f"{folder}: unsupported format {meta.get('format')}")
        try:
            data = cls(meta["dataset"], arrays["indptr"], arrays["items"], arrays["part"],
                       arrays["users"], arrays["item_ids"], int(meta["max_len"]),
                       int(meta["split_seed"]), tuple(meta["split_fractions"]),
                       int(meta["min_count"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise FedShareError(f"{folder} holds inconsistent sequence data ({type(exc).__name__}"
                                f": {exc})") from None
        if data.fingerprint() != meta["fingerprint"]:
            raise FedShareError(f"{folder}: sessions do not match their fingerprint")
        return data


def core_filter(frame: pd.DataFrame, min_count: int) -> pd.DataFrame:
    """Rows whose user and item both keep >= ``min_count`` rows, repeated to a fixed point."""
    while True:
        users = frame.groupby("user")["item"].transform("size")
        items = frame.groupby("item")["user"].transform("size")
        keep = (users >= min_count) & (items >= min_count)
        if keep.all():
            return frame
        frame = frame[keep]


def split_sessions(num_sessions: int, fractions: tuple[float, float, float],
                   seed: int) -> np.ndarray:
    """TRAIN / VALID / TEST label per session: the first ``round(f_train * S)`` of a seeded
    permutation train, the next ``round(f_valid * S)`` validate, the rest test."""
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise FedShareError(f"split fractions must be three non-negative numbers summing to 1, "
                            f"got {tuple(fractions)}")
    order = np.random.default_rng(seed).permutation(num_sessions)
    n_train = round(fractions[0] * num_sessions)
    n_valid = round(fractions[1] * num_sessions)
    part = np.full(num_sessions, TEST, dtype=np.int8)
    part[order[:n_train]] = TRAIN
    part[order[n_train:n_train + n_valid]] = VALID
    return part


def build_sequences(interactions: Interactions, dataset: str, *, min_count: int = 5,
                    max_len: int = 50,
                    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                    split_seed: int = 0) -> SequenceData:
    """Filter, sort, remap and split ``interactions`` into sessions (see the module docstring)."""
    if min_count < 1:
        raise FedShareError(f"min_count must be >= 1, got {min_count}")
    if max_len < 1:
        raise FedShareError(f"max_len must be >= 1, got {max_len}")
    frame = interactions.frame[["user", "item", "timestamp"]].reset_index(drop=True)
    frame = core_filter(frame, min_count)
    if frame.empty:
        raise FedShareError(f"no interactions are left after the {min_count}-core filter")
    item_codes, item_ids = pd.factorize(frame["item"], sort=True)
    frame = frame.assign(seq_item=item_codes.astype(np.int64) + 1)
    frame = frame.sort_values(["user", "timestamp"], kind="stable")
    users, counts = np.unique(frame["user"].to_numpy(np.int64), return_counts=True)
    indptr = np.zeros(len(users) + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    part = split_sessions(len(users), tuple(split_fractions), split_seed)
    return SequenceData(dataset, indptr, frame["seq_item"].to_numpy(np.int64), part, users,
                        np.asarray(item_ids, dtype=np.int64), max_len, split_seed,
                        tuple(float(f) for f in split_fractions), min_count)


def prepare_sequences(dataset: str, path: str | Path | None = None, **kwargs) -> SequenceData:
    """Load ``dataset`` with the project's loaders (no user filter of their own) and build its
    sessions; keyword arguments go to :func:`build_sequences`."""
    return build_sequences(load_dataset(dataset, path, 0).interactions, dataset, **kwargs)


def pad_sessions(sessions: list[np.ndarray], length: int) -> np.ndarray:
    """``[len(sessions), length]`` int64: each session's last ``length`` items, left-padded."""
    out = np.full((len(sessions), length), PAD, dtype=np.int64)
    for row, session in enumerate(sessions):
        tail = np.asarray(session, dtype=np.int64)[-length:]
        if len(tail):
            out[row, length - len(tail):] = tail
    return out
