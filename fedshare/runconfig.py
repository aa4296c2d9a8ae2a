"""Reading a Flower run config: which data, which settings, which users a node serves.

Run-config keys are those of ``[tool.flwr.app.config]`` in ``pyproject.toml``; data keys name the
dataset and plan, app keys how the run is served, every other key is a :class:`FederatedConfig`
field (dashes for underscores). ``family`` picks the model family; the sequence family reads the
round schedule from the shared keys and the rest from its ``seq-`` keys
(:class:`fedshare.sequences.config.SequenceConfig`). ``defence`` names the upload defences,
joined with ``+`` (:func:`fedshare.defences.parse_defences`, :func:`upload_defence`); ``secagg``
reads the ``secagg-`` keys (:class:`SecAggSettings`, :func:`secagg_settings`). Kept
Flower-free (plain mappings) so it is tested directly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedshare.data.device import DeviceData
from fedshare.data.prepared import PreparedData, prepare
from fedshare.data.sharing import SharingConfig
from fedshare.defences import UploadDefence, parse_defences
from fedshare.errors import FedShareError
from fedshare.federated.config import FederatedConfig
from fedshare.sequences.config import RUN_KEYS as SEQUENCE_RUN_KEYS
from fedshare.sequences.config import SequenceConfig
from fedshare.sequences.unlearning_config import RUN_KEYS as SEQUENCE_UNLEARNING_KEYS
from fedshare.sequences.unlearning_config import SequenceUnlearning
from fedshare.unlearning.config import VARIANTS, UnlearningConfig
from fedshare.unlearning.remaining import remaining_data

if TYPE_CHECKING:
    from fedshare.sequences.data import SequenceData
    from fedshare.unlearning.fru_selection import FruSettings

DATA_KEYS = ("dataset", "data-path", "prepared", "split-seed", "plan-seed")
UNLEARN_KEYS = ("unlearn", "unlearn-rounds", "unlearn-steps", "unlearn-lr", "unlearn-tau",
                "unlearn-bpr", "unlearn-forgotten-graph", "unlearn-remaining-fl",
                "unlearn-weight", "unlearn-include-self", "unlearn-local-epochs")
FRU_KEYS = ("fru-alpha", "fru-beta", "fru-pool", "fru-sampling")
REPLAY_KEYS = ("unlearning", "replay-epoch-fraction", "replay-interval")
FAMILIES = ("lightgcn", "sequence")
"""The app's model families: LightGCN (FedShare) and sequence models (issue 17)."""
SEQUENCE_KEYS = ("family", *SEQUENCE_RUN_KEYS, *SEQUENCE_UNLEARNING_KEYS)
SECAGG_KEYS = ("secagg-num-shares", "secagg-threshold", "secagg-clip",
               "secagg-quantization-bits", "secagg-modulus-bits")
DEFENCE_KEYS = ("defence", "decoy-rows", "ldp-clip", "ldp-noise", "ldp-delta", *SECAGG_KEYS)
APP_KEYS = ("num-nodes", "out-dir", "audit-dir", "node-timeout", "round-timeout", *FRU_KEYS,
            "max-failed-fraction", "client-state-dir", "bind-users", *UNLEARN_KEYS,
            *REPLAY_KEYS, *SEQUENCE_KEYS, *DEFENCE_KEYS)
UNLEARNING_METHODS = (*VARIANTS, "fru", "cufru", "retrain")
"""What ``unlearning=...`` may name through Flower: FedShare (Algorithm 2), its Table IV
ablations and its named variant, the FRU / CUFRU baselines, which also change what is
recorded while learning, and Retrain (the learning phase again on the remaining data)."""
DEVICE_FILE = "device-file"
"""Node-config key of a deployed device's own data (:mod:`fedshare.data.device`)."""


def federated_config(run_config: Mapping[str, Any]) -> FederatedConfig:
    settings = {k: v for k, v in run_config.items() if k not in DATA_KEYS + APP_KEYS}
    return FederatedConfig.from_mapping(settings)


def fru_settings(run_config: Mapping[str, Any]) -> FruSettings | None:
    """FRU's storage settings from ``fru-alpha``, ``fru-beta``, ``fru-pool`` and
    ``fru-sampling`` (defaults: :class:`FruSettings`'), or ``None`` when ``fru-alpha`` is 0 or
    absent and the run does not unlearn with FRU (the nodes keep no FRU rows)."""
    from fedshare.unlearning.fru_selection import FruSettings  # only FRU runs import it

    defaults = FruSettings()
    alpha = run_config.get("fru-alpha", 0.0)
    off = isinstance(alpha, int | float) and not isinstance(alpha, bool) and alpha == 0
    if off and unlearning_method(run_config) == "fru":  # the run will need the rows
        alpha, off = defaults.alpha, False
    settings = FruSettings(defaults.alpha if off else alpha,  # the others are checked anyway
                           run_config.get("fru-beta", defaults.beta),
                           run_config.get("fru-pool", defaults.pool),
                           run_config.get("fru-sampling", defaults.sampling))
    return None if off else settings


def unlearning_config(run_config: Mapping[str, Any]) -> UnlearningConfig | None:
    """The unlearning phase's settings, or ``None`` when the run has no unlearning phase."""
    if not bool(run_config.get("unlearn", False)):
        return None
    if run_config.get("variant") == "pdc-frs":
        raise FedShareError("variant pdc-frs has no unlearning phase: its server holds "
                            "perturbed items, which unsharing requests cannot name")
    defaults = UnlearningConfig()
    values = {key.removeprefix("unlearn-").replace("-", "_"): run_config[key]
              for key in UNLEARN_KEYS[1:] if key in run_config}
    try:
        return UnlearningConfig(**{k: type(getattr(defaults, k))(v) for k, v in values.items()})
    except (TypeError, ValueError):
        raise FedShareError(f"bad unlearning setting in {values}") from None


def unlearning_method(run_config: Mapping[str, Any]) -> str:
    """The unlearning method a run records for and runs (``fedshare`` by default)."""
    method = str(run_config.get("unlearning", "fedshare") or "fedshare")
    if method not in UNLEARNING_METHODS:
        raise FedShareError(f"unknown unlearning method {method!r}; one of "
                            f"{', '.join(UNLEARNING_METHODS)}")
    return method


def replay_settings(run_config: Mapping[str, Any]) -> dict[str, float]:
    """FRU's and CUFRU's replay settings given in the run config (``replay-epoch-fraction``,
    ``replay-interval``), as ``ReplayConfig`` keyword arguments."""
    names = {"replay-epoch-fraction": ("epoch_fraction", float),
             "replay-interval": ("interval", int)}
    try:
        return {names[k][0]: names[k][1](run_config[k]) for k in names if k in run_config}
    except (TypeError, ValueError):
        raise FedShareError("replay-epoch-fraction must be a number and replay-interval a "
                            "whole number") from None


DEFAULT_DEFENCE = "secagg+hidden"
"""``defence`` in ``pyproject.toml`` (a test keeps them equal): a Flower run, simulated or
deployed, sums securely (SecAgg+: :mod:`fedshare.secure_sum`, :mod:`strategies.secagg`,
:mod:`clients.secagg`) and devices choose themselves whether they train (``hidden``), unless
told otherwise: the default that ``fedshare privacy-audit`` found to hide local items
(:mod:`fedshare.defences`). The in-process engine is the undefended research fast path: it
applies a defence only when the run's settings name one."""


def upload_defence(run_config: Mapping[str, Any], default: str = DEFAULT_DEFENCE
                   ) -> UploadDefence:
    """The devices' upload defence (``defence``, ``decoy-rows``, ``ldp-clip``, ``ldp-noise``,
    ``ldp-delta``; ``default`` when ``defence`` is absent).

    ``hidden`` participation is refused with FRU and CUFRU: their histories record who
    trained in each round, which the server no longer knows.
    """
    names = parse_defences(run_config.get("defence", default))
    try:
        defence = UploadDefence(names, int(run_config.get("decoy-rows", 0)),
                                float(run_config.get("ldp-clip", 1.0)),
                                float(run_config.get("ldp-noise", 1.0)),
                                float(run_config.get("ldp-delta", 1e-5)))
    except (TypeError, ValueError):
        raise FedShareError("decoy-rows must be a whole number and ldp-clip, ldp-noise, "
                            "ldp-delta numbers") from None
    if defence.hidden and (unlearning_method(run_config) in ("fru", "cufru")
                           or fru_settings(run_config) is not None):
        raise FedShareError("defence=hidden keeps who trained from the server, which FRU's and "
                            "CUFRU's histories record; drop hidden or choose another method")
    return defence


@dataclass(frozen=True)
class SecAggSettings:
    """SecAgg+ settings (run-config keys ``secagg-num-shares``, ``secagg-threshold``,
    ``secagg-clip``, ``secagg-quantization-bits``, ``secagg-modulus-bits``).

    Args:
        num_shares: how many nodes hold shares of each node's two secrets, the node itself
            included: its neighbours on a ring of the round's nodes, as many on either side,
            so the number is odd (a round with fewer nodes shares among all of them).
        threshold: shares that reconstruct a secret; more than half of ``num_shares``, so a
            server that tells some neighbours a node dropped and others that it did not still
            cannot get both secrets of one node, and at most ``num_shares``. A round in which
            fewer nodes answer changes nothing.
        clip: the bound of one coordinate of a node's normalised upload (its users' summed
            ``|D_u| (V_u - V_s)`` over the round's total weight): how far one round may move a
            coordinate of the weighted-mean update; beyond it values are clipped.
        quantization_bits: the clipped range ``[-clip, clip]`` maps onto ``[0, 2**bits]``;
            the quantum is ``2 clip / 2**bits`` (at most 30: Flower's quantiser rounds into
            int32).
        modulus_bits: masks and sums live modulo ``2**bits`` (at most 62: int64 arithmetic);
            it must exceed a round's node count times ``2**quantization_bits``.
    """

    num_shares: int = 3
    threshold: int = 2
    clip: float = 8.0
    quantization_bits: int = 30
    modulus_bits: int = 62

    def __post_init__(self) -> None:
        ints = (self.num_shares, self.threshold, self.quantization_bits, self.modulus_bits)
        if any(isinstance(v, bool) or not isinstance(v, int) for v in ints) or isinstance(
                self.clip, bool) or not isinstance(self.clip, int | float):
            raise FedShareError("secagg-num-shares, -threshold, -quantization-bits and "
                                "-modulus-bits must be whole numbers and secagg-clip a number")
        if self.num_shares < 3 or self.num_shares % 2 == 0:
            raise FedShareError(f"secagg-num-shares must be odd and >= 3, got {self.num_shares}")
        if not self.num_shares // 2 < self.threshold <= self.num_shares:
            raise FedShareError(f"secagg-threshold must be more than half of secagg-num-shares "
                                f"and at most it, got {self.threshold} of {self.num_shares}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise FedShareError(f"secagg-clip must be a positive number, got {self.clip}")
        if not 1 <= self.quantization_bits <= 30:
            raise FedShareError("secagg-quantization-bits must lie in [1, 30], got "
                                f"{self.quantization_bits}")
        if not self.quantization_bits < self.modulus_bits <= 62:
            raise FedShareError("secagg-modulus-bits must exceed secagg-quantization-bits and "
                                f"be at most 62, got {self.modulus_bits}")

    @property
    def quantization(self) -> int:
        return 1 << self.quantization_bits

    @property
    def modulus(self) -> int:
        return 1 << self.modulus_bits

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> SecAggSettings:
        names = {key: key.removeprefix("secagg-").replace("-", "_") for key in SECAGG_KEYS}
        return cls(**{names[key]: run_config[key] for key in SECAGG_KEYS if key in run_config})

    def to_run_config(self) -> dict[str, Any]:
        return {f"secagg-{name.replace('_', '-')}": value for name, value in vars(self).items()}


def secagg_settings(run_config: Mapping[str, Any], default: str = DEFAULT_DEFENCE
                    ) -> SecAggSettings | None:
    """The run's SecAgg+ settings, or ``None`` when ``defence`` (``default`` when the key is
    absent) does not name ``secagg``.

    Refused with ``secagg``: what needs each node's own update, which the server no longer
    sees. ``unlearning = "cufru"``: CUFRU's transfer station keeps every sharer's sparse update
    to subtract it later. FRU (``fru-alpha`` > 0, or ``unlearning = "fru"``): its replay asks
    nodes for their stored rows and reads each reply's store report, per node.
    """
    if "secagg" not in parse_defences(run_config.get("defence", default)):
        return None
    method = unlearning_method(run_config)
    if method == "cufru":
        raise FedShareError("defence=secagg hides each node's update, which unlearning=cufru "
                            "stores per sharer; set defence=none or choose another method")
    if fru_settings(run_config) is not None:
        raise FedShareError("defence=secagg hides each node's update, which FRU's replay "
                            "(fru-alpha > 0 or unlearning=fru) reads per node; set "
                            "defence=none or fru-alpha=0")
    return SecAggSettings.from_run_config(run_config)


@dataclass
class ServerSettings:
    """What the ServerApp reads from its run config, besides the data keys it never uses."""

    config: FederatedConfig
    unlearning: UnlearningConfig | None
    out_dir: Path
    audit_dir: str
    num_nodes: int
    node_timeout: float
    round_timeout: float
    max_failed: float
    bind: bool
    run_config: dict[str, Any]
    method: str = "fedshare"
    replay: dict[str, float] | None = None
    secagg: SecAggSettings | None = None
    defence: UploadDefence | None = None

    @classmethod
    def read(cls, run_config: Mapping[str, Any]) -> ServerSettings:
        default_out = f"runs/flwr-{time.strftime('%Y%m%d-%H%M%S')}"
        return cls(federated_config(run_config), unlearning_config(run_config),
                   Path(str(run_config.get("out-dir") or default_out)),
                   str(run_config.get("audit-dir") or ""), int(run_config.get("num-nodes", 2)),
                   float(run_config.get("node-timeout", 120)),
                   float(run_config.get("round-timeout", 3600)),
                   float(run_config.get("max-failed-fraction", 0.5)),
                   # simulated nodes draw new ids every run: nothing to bind users to
                   bool(run_config.get("bind-users", True)), dict(run_config),
                   unlearning_method(run_config), replay_settings(run_config),
                   secagg_settings(run_config), upload_defence(run_config))

    def recorded(self) -> dict[str, Any]:
        """``config.json``: every federated setting, then the run config's other keys."""
        return {**self.config.to_dict(), **{k: v for k, v in self.run_config.items()
                                            if k not in self.config.to_run_config()}}


def data_key(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> tuple:
    """What identifies the data: a device file (deployment), else the run's data keys with
    node settings overriding them."""
    if DEVICE_FILE in node_config:
        return (DEVICE_FILE, str(node_config[DEVICE_FILE]))
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
    if key[0] == DEVICE_FILE:
        return load_device(key[1]).prepared()
    dataset, path, prepared, split_seed, plan_seed = key
    if prepared:
        return PreparedData.load(prepared)
    return prepare(str(dataset or "ml-100k"), str(path) if path else None,
                   split_seed=int(split_seed or 0), sharing=SharingConfig(seed=int(plan_seed or 0)))


@lru_cache(maxsize=4)
def load_device(path: str) -> DeviceData:
    return DeviceData.load(path)


def node_users(node_config: Mapping[str, Any], num_users: int) -> np.ndarray:
    """The users a node serves.

    ``device-file=...`` (a deployed device: the user of its file), ``user-id=7`` (one user per
    node) or ``partition-id=p num-partitions=n`` (simulation: cohort ``p`` of ``n`` contiguous
    ranges).
    """
    if DEVICE_FILE in node_config:
        return np.array([load_device(str(node_config[DEVICE_FILE])).user], dtype=np.int64)
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


def node_label(node_config: Mapping[str, Any]) -> str:
    """A file-name-safe name of what a node serves (its saved client state is named so)."""
    if DEVICE_FILE in node_config:
        return f"user-{load_device(str(node_config[DEVICE_FILE])).user}"
    if "user-id" in node_config:
        return f"user-{int(node_config['user-id'])}"
    return f"partition-{int(node_config['partition-id'])}-of-{int(node_config['num-partitions'])}"


# ------------------------------------------------------------------ the sequence family
def model_family(run_config: Mapping[str, Any]) -> str:
    """``lightgcn`` (the default) or ``sequence``: which model the app trains."""
    family = run_config.get("family", "lightgcn") or "lightgcn"
    if family not in FAMILIES:
        raise FedShareError(f"unknown family {family!r}; one of {', '.join(FAMILIES)}")
    return str(family)


def sequence_config(run_config: Mapping[str, Any]) -> SequenceConfig:
    """The sequence family's settings (:class:`SequenceConfig`), checked."""
    return SequenceConfig.from_run_config(run_config)


def sequence_unlearning(run_config: Mapping[str, Any]) -> SequenceUnlearning | None:
    """The sequence family's unlearning settings (checked), or ``None`` without ``unlearn``."""
    if not bool(run_config.get("unlearn", False)):
        return None
    return SequenceUnlearning.from_run_config(run_config)


def sequence_data_key(run_config: Mapping[str, Any]) -> tuple:
    """What identifies a run's sessions: a prepared folder, else what to prepare them from."""
    config = sequence_config(run_config)
    if config.data:
        return (config.data,)
    return (str(run_config.get("dataset") or "ml-100k"), str(run_config.get("data-path") or ""),
            int(run_config.get("split-seed") or 0), config.max_len)


@lru_cache(maxsize=4)
def load_sequences(key: tuple) -> SequenceData:
    """The sessions named by :func:`sequence_data_key`, loaded once per process."""
    from fedshare.sequences.data import SequenceData, prepare_sequences

    if len(key) == 1:
        return SequenceData.load(key[0])
    dataset, path, split_seed, max_len = key
    return prepare_sequences(dataset, path or None, max_len=max_len, split_seed=split_seed)


def node_sessions(node_config: Mapping[str, Any], num_sessions: int) -> np.ndarray:
    """The devices (sessions) a node serves, named as :func:`node_users` names users:
    ``user-id`` (one device per node) or ``partition-id`` / ``num-partitions``."""
    if DEVICE_FILE in node_config:
        raise FedShareError("a device file holds LightGCN data; a sequence node takes user-id, "
                            "or partition-id and num-partitions")
    return node_users(node_config, num_sessions)
