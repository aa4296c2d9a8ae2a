"""A split plus a sharing plan: everything a run needs to be repeated exactly.

Written to disk as one folder (``meta.json``, ``interactions.npz``); the folder appears only when
complete (written beside it, then renamed), so a failed write never leaves half a plan. Loading
checks a fingerprint of the interactions, so a plan cannot silently be applied to other data.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedshare.atomic import read_data_folder, write_data_folder
from fedshare.data.dataset import load_dataset
from fedshare.data.interactions import Interactions
from fedshare.data.sharing import SharingConfig, SharingPlan, make_plan
from fedshare.data.split import TRAIN, Split, split_by_parts, split_parts
from fedshare.errors import FedShareError

FORMAT_VERSION = 1


@dataclass(frozen=True)
class PreparedData:
    """The data of one experiment: which dataset, how it was split, who shares what."""

    dataset: str
    split: Split
    plan: SharingPlan
    split_seed: int
    split_fractions: tuple[float, float, float]

    @property
    def num_users(self) -> int:
        return self.split.num_users

    @property
    def num_items(self) -> int:
        return self.split.num_items

    def fingerprint(self) -> str:
        return _fingerprint(self.split)

    def save(self, folder: str | Path) -> Path:
        parts = [self.split.train, self.split.valid, self.split.test]
        labels = np.concatenate([np.full(len(p), k, np.int8) for k, p in enumerate(parts)])
        frames = [p.frame for p in parts]
        arrays = {"user": np.concatenate([f["user"].to_numpy() for f in frames]),
                  "item": np.concatenate([f["item"].to_numpy() for f in frames]),
                  "timestamp": np.concatenate([f["timestamp"].to_numpy() for f in frames]),
                  "part": labels, "group": self.plan.group, "shared": self.plan.shared,
                  "unlearn": self.plan.unlearn}
        meta = {"format": FORMAT_VERSION, "dataset": self.dataset,
                "num_users": self.num_users, "num_items": self.num_items,
                "split_seed": self.split_seed, "split_fractions": self.split_fractions,
                "sharing": self.plan.config.to_dict(), "fingerprint": self.fingerprint(),
                "plan_digest": _plan_digest({"group": self.plan.group,
                                             "shared": self.plan.shared,
                                             "unlearn": self.plan.unlearn})}
        return write_data_folder(Path(folder), "interactions.npz", arrays, meta)

    @classmethod
    def load(cls, folder: str | Path) -> PreparedData:
        folder = Path(folder)
        meta, arrays = read_data_folder(folder, "interactions.npz", "prepared-data")
        if meta.get("format") != FORMAT_VERSION:
            raise FedShareError(f"{folder}: unsupported format {meta.get('format')}")
        try:
            return cls._from_parts(meta, arrays)
        except FedShareError as exc:
            raise FedShareError(f"{folder}: {exc}") from None
        except (KeyError, ValueError, TypeError) as exc:
            raise FedShareError(f"{folder} holds inconsistent prepared data ({type(exc).__name__}: "
                                f"{exc})") from None

    @classmethod
    def _from_parts(cls, meta: dict, arrays: dict[str, np.ndarray]) -> PreparedData:
        data = Interactions.from_arrays(arrays["user"], arrays["item"], meta["num_users"],
                                        meta["num_items"], arrays["timestamp"])
        split = split_by_parts(data, arrays["part"])
        if _fingerprint(split) != meta["fingerprint"]:
            raise FedShareError("interactions do not match their fingerprint")
        if len(arrays["shared"]) != len(split.train) or len(arrays["unlearn"]) != len(
                split.train) or len(arrays["group"]) != split.num_users:
            raise FedShareError("sharing plan does not fit its training set")
        if _plan_digest(arrays) != meta["plan_digest"]:
            raise FedShareError("sharing plan does not match its checksum")
        sharing = meta["sharing"]
        config = SharingConfig(**{**sharing, "group_fractions": tuple(sharing["group_fractions"])})
        plan = SharingPlan(config, arrays["group"], arrays["shared"], arrays["unlearn"])
        return cls(meta["dataset"], split, plan, meta["split_seed"],
                   tuple(meta["split_fractions"]))


def _fingerprint(split: Split) -> str:
    digest = hashlib.sha256()
    for part in (split.train, split.valid, split.test):
        digest.update(np.ascontiguousarray(part.users).tobytes())
        digest.update(np.ascontiguousarray(part.items).tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:16]


def _plan_digest(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in ("group", "shared", "unlearn"):
        digest.update(np.ascontiguousarray(arrays[key]).astype(np.int8).tobytes())
    return digest.hexdigest()[:16]


def prepare(dataset: str, path: str | Path | None = None, *,
            min_user_interactions: int | None = None,
            split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), split_seed: int = 0,
            sharing: SharingConfig | None = None) -> PreparedData:
    """Load ``dataset``, split it and draw its sharing plan."""
    sharing = sharing or SharingConfig()
    data = load_dataset(dataset, path, min_user_interactions).interactions
    parts = split_parts(data, split_fractions, split_seed)
    split = split_by_parts(data, parts)
    assert (parts == TRAIN).sum() == len(split.train)
    return PreparedData(dataset, split, make_plan(split.train, sharing), split_seed,
                        tuple(split_fractions))
