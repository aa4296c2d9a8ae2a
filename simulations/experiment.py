"""One federated run from a config file: ``fedshare run --config FILE [--set key=value ...]``.

A config file (``simulations/configs/*.toml``) has a ``[run]`` table of run-config keys (those of
``[tool.flwr.app.config]`` in ``pyproject.toml``) and a ``[federation]`` table
(``num-supernodes``). A run writes ``runs/<name>-<timestamp>/``: the resolved ``config.toml``,
``metrics.csv`` (one row per validation), ``summary.json`` and, for the Flower engine,
``flower.log``. The ``flower`` engine runs the real app (ServerApp, virtual SuperNodes on Ray);
``inprocess`` runs the same client, aggregation and server code in one process
(:func:`fedshare.federated.inprocess.run_inprocess`), which gives the same numbers faster.
``family = "sequence"`` runs a sequence model instead (:mod:`simulations.sequence_experiment`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedshare.atomic import write_json
from fedshare.errors import FedShareError
from fedshare.federated.config import FederatedConfig
from fedshare.run_lease import RunLease, ensure_free
from fedshare.runconfig import (
    APP_KEYS,
    DATA_KEYS,
    DEFAULT_DEFENCE,
    SecAggSettings,
    data_key,
    federated_config,
    fru_settings,
    load_data,
    model_family,
    replay_settings,
    secagg_settings,
    sequence_config,
    sequence_unlearning,
    unlearning_config,
    unlearning_method,
    upload_defence,
)
from simulations.flower_runner import (
    STARTUP,
    check_ray_address,
    run_flower,
    toml_value,
    write_toml,
)

ENGINES = ("flower", "inprocess")
DATA_DEFAULTS = {"dataset": "ml-100k", "data-path": "", "prepared": "", "split-seed": 0,
                 "plan-seed": 0}


@dataclass
class Experiment:
    """A resolved run: name, run config (every key), federation size."""

    name: str
    run: dict[str, Any]
    num_supernodes: int = 2
    notes: list[str] = field(default_factory=list)

    @property
    def config(self) -> FederatedConfig:
        return federated_config(self.run)


def parse_value(text: str) -> Any:
    """A ``--set`` value: a TOML scalar if it parses as one, else a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def resolve(path: str | Path | None, sets: Sequence[str] = (), name: str | None = None
            ) -> Experiment:
    """Read a config file (or the defaults), apply ``key=value`` overrides, validate all."""
    table: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            table = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise FedShareError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise FedShareError(f"{path} is not valid TOML: {exc}") from None
    unknown_tables = set(table) - {"run", "federation"}
    if unknown_tables:
        raise FedShareError(f"unknown table(s) {sorted(unknown_tables)} in config; "
                            "use [run] and [federation]")
    run = {**DATA_DEFAULTS, **FederatedConfig().to_run_config(), **table.get("run", {})}
    federation = dict(table.get("federation", {}))
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise FedShareError(f"--set expects key=value, got {item!r}")
        key = key.strip()
        if key == "num-supernodes":
            federation[key] = parse_value(value)
        else:
            run[key] = parse_value(value.strip())
    known = set(FederatedConfig().to_run_config()) | set(DATA_KEYS) | set(APP_KEYS)
    unknown = sorted(set(run) - known)
    if unknown:
        raise FedShareError(f"unknown run setting(s) {', '.join(unknown)}")
    num_supernodes = federation.pop("num-supernodes", 2)
    if federation:
        raise FedShareError(f"unknown federation setting(s) {', '.join(sorted(federation))}")
    if isinstance(num_supernodes, bool) or not isinstance(num_supernodes, int) \
            or num_supernodes < 1:
        raise FedShareError("num-supernodes must be a positive integer")
    run["num-nodes"] = num_supernodes
    for key in ("fru-alpha", "max-failed-fraction"):
        value = run.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise FedShareError(f"{key} must be a number in [0, 1], got {value!r}")
    fru_settings(run)  # FRU's settings: FruSettings validates them
    SecAggSettings.from_run_config(run)  # SecAgg+'s, and a defence named here
    secagg_settings(run, default="none")  # (the Flower default is checked before a run)
    upload_defence(run, default="none")
    if model_family(run) == "sequence":
        sequence_config(run)  # the sequence family's settings: SequenceConfig validates them
        sequence_unlearning(run)  # and, with unlearn=true, SequenceUnlearning
    experiment = Experiment(name or (Path(path).stem if path else "default"), run,
                            num_supernodes)
    experiment.config  # noqa: B018 - validates every federated setting now, before any work
    return experiment


def run_experiment(experiment: Experiment, out_root: str | Path = "runs", engine: str = "flower",
                   progress: Callable[[str], None] | None = None,
                   ray_address: str | None = None, resume: str | Path | None = None,
                   startup: float = STARTUP) -> tuple[Path, dict]:
    """Run ``experiment``; return its folder and summary. ``ray_address``: run the Flower
    engine's virtual nodes on that Ray cluster. ``resume``: an earlier Flower run's folder;
    the run continues from the last round committed to its ``state.db``. ``startup``: seconds
    a Flower run may take to begin its share round."""
    if engine not in ENGINES:
        raise FedShareError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if resume is not None and engine != "flower":
        raise FedShareError("resuming a run needs the flower engine (its state.db)")
    if model_family(experiment.run) == "sequence":
        from simulations.sequence_experiment import run_sequence_experiment

        return run_sequence_experiment(experiment, out_root, engine, progress, ray_address,
                                       resume, startup)
    load_data(data_key(experiment.run, {}))  # bad data fail here, before any folder or process
    unlearning_method(experiment.run), replay_settings(experiment.run)  # and bad settings
    if engine == "flower":  # and a Ray cluster named but not there
        secagg_settings(experiment.run)  # the default defence too: Flower applies it
        upload_defence(experiment.run)
        check_ray_address(ray_address or os.environ.get("RAY_ADDRESS") or "local")
    if progress is not None:
        config = experiment.config
        default = DEFAULT_DEFENCE if engine == "flower" else "none"
        defence = experiment.run.get("defence", default) or "none"
        progress(f"run {experiment.name}: {config.variant}, {config.rounds} rounds, "
                 f"{experiment.num_supernodes} nodes, engine {engine}, uploads defended by "
                 f"{defence}" + (" (the undefended research fast path)"
                                 if engine == "inprocess" and defence == "none" else "")
                 + (f"; shared items perturbed with epsilon {config.pdc_epsilon:g} each"
                    if config.pdc is not None else ""))
    out = resumed_folder(resume) if resume is not None else new_folder(out_root, experiment.name)
    run = {**experiment.run, "out-dir": str(out)}
    if engine == "flower" and not run.get("client-state-dir"):
        # the clients' private state lives with the run, so a resumed run ends where an
        # uninterrupted one ends (a resume reads this setting back from config.toml)
        run["client-state-dir"] = str(out / "client-state")
    if resume is None:  # a resumed run's settings replace the recorded ones once it succeeds
        record_settings(out, run, experiment.num_supernodes)
    if engine == "flower":
        summary_path = out / "summary.json"
        before = summary_path.stat().st_mtime_ns if summary_path.exists() else None
        log = out / ("flower.log" if resume is None else  # the first run's log stays
                     f"flower-resumed-{time.strftime('%Y%m%d-%H%M%S')}.log")
        run_flower(run, experiment.num_supernodes, log, progress, ray_address=ray_address,
                   startup=startup)
        if not summary_path.exists() or summary_path.stat().st_mtime_ns == before:
            raise FedShareError(f"the Flower run ended without a summary; see {log}")
        record_settings(out, run, experiment.num_supernodes)
        return out, json.loads(summary_path.read_text())
    return out, _run_inprocess(run, out, progress)


def record_settings(out: Path, run: dict[str, Any], num_supernodes: int) -> None:
    write_toml(out / "config.toml", run)
    write_toml(out / "federation.toml", {"num-supernodes": num_supernodes})


def new_folder(out_root: str | Path, name: str) -> Path:
    """A new folder ``out_root/name-STAMP`` (``-2``, ``-3``, ... when taken): created in one
    step, so two commands started in the same second never share one."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = Path(out_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    for suffix in range(1, 10_000):
        out = root / (f"{name}-{stamp}" if suffix == 1 else f"{name}-{stamp}-{suffix}")
        try:
            out.mkdir()
        except FileExistsError:
            continue
        return out
    raise FedShareError(f"no free folder name for {name} in {root}")


@contextlib.contextmanager
def leased_folder(out_root: str | Path, name: str) -> Iterator[Path]:
    """A :func:`new_folder` that the block writes as its only writer (a table command's
    folder): a server or another command pointed at it refuses while the block runs."""
    out = new_folder(out_root, name)
    with RunLease(out):
        yield out


def resumed_folder(folder: str | Path) -> Path:
    """A stopped run's folder: it has the run's settings and no live server writes to it. A
    run stopped before its state database was created (in its share round) starts again
    from the beginning there."""
    out = Path(folder).resolve()
    if not (out / "config.toml").is_file():
        raise FedShareError(f"{out} is not a run folder (no config.toml) to resume")
    ensure_free(out)
    return out


def resume_settings(folder: str | Path, sets: Sequence[str] = ()) -> Experiment:
    """The experiment a run folder recorded (``config.toml``, ``federation.toml``) with
    ``key=value`` overrides (e.g. more rounds) on top."""
    folder = resumed_folder(folder)
    try:
        run = tomllib.loads((folder / "config.toml").read_text())
        federation = tomllib.loads((folder / "federation.toml").read_text()) \
            if (folder / "federation.toml").exists() else {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise FedShareError(f"{folder} holds no readable run settings ({exc})") from None
    recorded = [f"{k}={toml_value(v)}" for k, v in run.items() if k != "out-dir"]
    recorded += [f"num-supernodes={v}" for v in federation.values()]
    return resolve(None, [*recorded, *sets], name=folder.name)


def _run_inprocess(run: dict[str, Any], out: Path,
                   progress: Callable[[str], None] | None) -> dict:
    # Imported here: a Flower run's launcher only waits for its processes, and the engine
    # (PyG, and numba through PyG) would add some 200 MB to it.
    from fedshare.federated.inprocess import run_inprocess
    from fedshare.federated.rounds import progress_line
    from fedshare.federated.summary import PhaseSummary, RunSummary
    from fedshare.storage_ledger import FRU_CLIENT
    from fedshare.unlearning.cufru import TransferStation
    from fedshare.unlearning.fru import FruHistory, FruSettings
    from fedshare.unlearning.phase import unlearn
    from fedshare.unlearning.replay import ReplayConfig

    data = load_data(data_key(run, {}))
    config = federated_config(run)
    report = None if progress is None else (lambda row: progress(progress_line(row)))
    unlearning, method = unlearning_config(run), unlearning_method(run)
    replayed = unlearning is not None and method in ("fru", "cufru")
    recorders: tuple = ()
    if replayed:
        recorders = (FruHistory(fru_settings(run) or FruSettings()),) if method == "fru" \
            else (TransferStation(),)
    # the undefended fast path unless the run's settings name a defence (secagg changes
    # nothing here: the engine sums in one step, which is all a secure sum reveals)
    result = run_inprocess(data, config, report, recorders,
                           defence=upload_defence(run, default="none"))
    assert result.federation is not None
    federation, valid, test, phase = result.federation, result.valid, result.test, None
    if unlearning is not None:  # the same method the Flower strategy runs
        replay = ReplayConfig(**replay_settings(run))
        outcome = unlearn(federation, data, method, unlearning, config.rounds, replay)
        federation = outcome.federation
        valid, test = federation.evaluate("valid"), federation.evaluate("test")
        assert outcome.store is not None
        settings = replay.to_dict() if replayed else unlearning.to_dict()
        phase = PhaseSummary(result.valid, result.test, outcome.seconds, outcome.kept_bytes,
                             len(outcome.store.log), int(data.plan.unlearn.sum()),
                             settings, method, **outcome.traffic.to_dict())
    server = federation.server
    np.save(out / "item_table.npy", server.table.numpy())
    result.federation.log.frame().to_csv(out / "metrics.csv", index=False)
    summary = RunSummary(config.variant, config.rounds, "inprocess", valid, test, result.seconds,
                         int(data.plan.shared.sum()) if config.shares else 0,
                         server.snapshot_bytes(), len(server.snapshots),
                         federation.ledger.held(kind=FRU_CLIENT), phase=phase,
                         mending=server.mending_stats()).to_dict()
    write_json(out / "summary.json", summary)
    return summary
