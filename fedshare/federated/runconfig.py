"""Reading a Flower run config: which data, which settings, which users a node serves.

Run-config keys are those of ``[tool.flwr.app.config]`` in ``pyproject.toml``; data keys name the
dataset and plan, every other key is a :class:`FederatedConfig` field (dashes for underscores).
Kept Flower-free (plain mappings) so it is tested directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np

from fedshare.data.prepared import PreparedData, prepare
from fedshare.data.sharing import SharingConfig
from fedshare.errors import FedShareError
from fedshare.federated.config import FederatedConfig
from fedshare.unlearning.contrastive import UnlearningConfig
from fedshare.unlearning.remaining import remaining_data

DATA_KEYS = ("dataset", "data-path", "prepared", "split-seed", "plan-seed")
UNLEARN_KEYS = ("unlearn", "unlearn-rounds", "unlearn-steps", "unlearn-lr", "unlearn-tau",
                "unlearn-bpr", "unlearn-forgotten-graph", "unlearn-remaining-fl",
                "unlearn-weight", "unlearn-include-self", "unlearn-local-epochs")
APP_KEYS = ("num-nodes", "out-dir", "audit-dir", "node-timeout", "fru-alpha",
            "max-failed-fraction", *UNLEARN_KEYS)


def federated_config(run_config: Mapping[str, Any]) -> FederatedConfig:
    settings = {k: v for k, v in run_config.items() if k not in DATA_KEYS + APP_KEYS}
    return FederatedConfig.from_mapping(settings)


def unlearning_config(run_config: Mapping[str, Any]) -> UnlearningConfig | None:
    """The unlearning phase's settings, or ``None`` when the run has no unlearning phase."""
    if not bool(run_config.get("unlearn", False)):
        return None
    defaults = UnlearningConfig()
    values = {key.removeprefix("unlearn-").replace("-", "_"): run_config[key]
              for key in UNLEARN_KEYS[1:] if key in run_config}
    try:
        return UnlearningConfig(**{k: type(getattr(defaults, k))(v) for k, v in values.items()})
    except (TypeError, ValueError):
        raise FedShareError(f"bad unlearning setting in {values}") from None


def data_key(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> tuple:
    """What identifies the data: node settings (deployment) override the run's."""
    merged = {**{k: run_config.get(k, "") for k in DATA_KEYS},
              **{k: node_config[k] for k in DATA_KEYS if k in node_config}}
    return tuple(merged[k] for k in DATA_KEYS)


@lru_cache(maxsize=4)
def load_remaining(key: tuple) -> PreparedData:
    """The same data after every planned unsharing request (what clients hold afterwards)."""
    return remaining_data(load_data(key))


@lru_cache(maxsize=4)
def load_data(key: tuple) -> PreparedData:
    """The prepared data named by :func:`data_key`, loaded once per process."""
    dataset, path, prepared, split_seed, plan_seed = key
    if prepared:
        return PreparedData.load(prepared)
    return prepare(str(dataset or "ml-100k"), str(path) if path else None,
                   split_seed=int(split_seed or 0), sharing=SharingConfig(seed=int(plan_seed or 0)))


def node_users(node_config: Mapping[str, Any], num_users: int) -> np.ndarray:
    """The users a node serves.

    ``user-id=7`` (one user per node: per-user mode, or a real deployed client) or
    ``partition-id=p num-partitions=n`` (simulation: cohort ``p`` of ``n`` contiguous ranges).
    """
    if "user-id" in node_config:
        user = int(node_config["user-id"])
        if not 0 <= user < num_users:
            raise FedShareError(f"user-id {user} outside [0, {num_users})")
        return np.array([user], dtype=np.int64)
    try:
        part, parts = int(node_config["partition-id"]), int(node_config["num-partitions"])
    except KeyError:
        raise FedShareError("node config needs user-id, or partition-id and num-partitions")\
            from None
    if parts < 1 or not 0 <= part < parts:
        raise FedShareError(f"partition-id {part} outside [0, num-partitions={parts})")
    return np.array_split(np.arange(num_users, dtype=np.int64), parts)[part]
