"""``fedshare run --set family=sequence``: a federated sequence run on either engine.

The launcher prepares the sessions once (``seq-data`` empty: ``dataset`` / ``data-path`` with
``seq-max-len`` and ``split-seed``; ML-100K by default) and saves them in the run folder, where
the nodes load them by path, as LightGCN nodes load a prepared folder. Every setting and the
data are checked before the folder is made, so a bad one leaves nothing behind. The ``flower``
engine runs the app's sequence family (:mod:`strategies.sequence`); ``inprocess`` runs
:func:`fedshare.sequences.federated.run_federated` with ``num-supernodes`` cohorts, which
gives the same model. Both write ``config.toml``, ``config.json``, ``metrics.csv``,
``model.npy`` (the best-validation vector) and ``summary.json``. With ``unlearn=true`` (flower
engine only) the app then serves the devices' unlearning requests
(:mod:`strategies.sequence_unlearning`): ``requests.json`` and ``unlearned_model.npy`` too.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedshare.atomic import write_atomically, write_json
from fedshare.errors import FedShareError
from fedshare.runconfig import (
    load_sequences,
    sequence_config,
    sequence_data_key,
    sequence_unlearning,
)
from fedshare.sequences.config import SequenceConfig
from fedshare.sequences.data import SequenceData
from fedshare.sequences.directory import count_parts
from fedshare.sequences.requests import sequence_requests
from fedshare.sequences.summary import SequenceSummary, progress_line
from simulations.experiment import Experiment, new_folder, record_settings
from simulations.flower_runner import STARTUP, check_ray_address, run_flower


def run_sequence_experiment(experiment: Experiment, out_root: str | Path = "runs",
                            engine: str = "flower",
                            progress: Callable[[str], None] | None = None,
                            ray_address: str | None = None, resume: str | Path | None = None,
                            startup: float = STARTUP) -> tuple[Path, dict]:
    """Run a sequence-family ``experiment``; return its folder and summary."""
    if resume is not None:
        raise FedShareError("a sequence run keeps no state database to resume from; start "
                            "it afresh")
    run = dict(experiment.run)
    config = sequence_config(run)
    unlearning = sequence_unlearning(run)
    if unlearning is not None and engine != "flower":
        raise FedShareError("sequence unlearning runs on the flower engine; in process use "
                            "fedshare cau-table")
    data = load_sequences(sequence_data_key(run))  # bad data fail here, before any folder
    if unlearning is not None:
        try:  # too few sessions with a forgettable position for the asked requests
            sequence_requests(data, unlearning.request_fraction, config.seed)
        except ValueError as exc:
            raise FedShareError(str(exc)) from None
    if engine == "flower":
        check_ray_address(ray_address or os.environ.get("RAY_ADDRESS") or "local")
    if progress is not None:
        progress(f"run {experiment.name}: sequence {config.backbone}, {config.rounds} rounds, "
                 f"{experiment.num_supernodes} nodes, engine {engine}")
    out = new_folder(out_root, experiment.name)
    run["out-dir"] = str(out)
    run["seq-data"] = str(Path(config.data).resolve()) if config.data else \
        str(data.save(out / "sequences"))
    record_settings(out, run, experiment.num_supernodes)
    if engine == "inprocess":
        return out, run_inprocess(data, config, out, experiment.num_supernodes, progress)
    log = out / "flower.log"
    run_flower(run, experiment.num_supernodes, log, progress, ray_address=ray_address,
               startup=startup)
    summary = out / "summary.json"
    if not summary.exists():
        raise FedShareError(f"the Flower run ended without a summary; see {log}")
    return out, json.loads(summary.read_text())


def run_inprocess(data: SequenceData, config: SequenceConfig, out: Path, nodes: int,
                  progress: Callable[[str], None] | None = None) -> dict:
    """:func:`run_federated` with the run's settings and ``nodes`` cohorts; its outputs."""
    from torch.nn.utils import parameters_to_vector

    from fedshare.sequences.federated import train_with

    started = time.perf_counter()

    def report(row: dict) -> None:
        if progress is not None:
            progress(progress_line(row["round"], time.perf_counter() - started, row))

    result = train_with(config, data, nodes=nodes, progress=report)
    vector = parameters_to_vector(result.model.parameters()).detach().numpy()
    summary = SequenceSummary("inprocess", config.backbone, config.rounds, result.best_round,
                              result.best_valid, result.test, time.perf_counter() - started,
                              count_parts(data.part.tolist()), len(vector)).to_dict()
    write_json(out / "config.json", {"family": "sequence", **config.to_dict(),
                                     "num_nodes": nodes, "out_dir": str(out)})
    write_atomically(out / "metrics.csv", lambda fh: result.log.to_csv(fh, index=False), "w")
    write_atomically(out / "model.npy", lambda fh: np.save(fh, vector))
    write_json(out / "summary.json", summary)
    return summary
