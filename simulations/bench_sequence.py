"""The sequence family's cohort benchmark: a Flower round with cohort nodes against one node per
device (``fedshare bench``, part ``sequence-flower``).

Both runs use the same sessions (ML-100K's by default), settings and seed, so every round samples
the same devices and the two runs must end with the same model (checked, reported as
``modes_agree``). Round 2 is timed (round 1 pays for starting the ClientApps): its train phase,
from sending the train messages to holding every reply, and the whole round (plus the
aggregation and the server step, the same work in both modes). Printed, never asserted: timings
depend on the machine.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def sequence_flower_modes(dataset: str = "ml-100k", path: str | None = None,
                          fraction: float = 0.1, cohorts: int = 2, seed: int = 0,
                          settings: Sequence[str] = ()) -> dict[str, Any]:
    """Devices trained per second in round 2, ``cohorts`` nodes against one node per device
    (``settings``: more ``key=value`` run settings, e.g. ``seq-backbone=gru4rec``)."""
    import pandas as pd

    from fedshare.sequences.data import TRAIN, prepare_sequences
    from simulations.experiment import resolve, run_experiment

    data = prepare_sequences(dataset, path, split_seed=seed)
    figures: dict[str, Any] = {"dataset": dataset, "sessions": data.num_sessions,
                               "training_devices": int((data.part == TRAIN).sum()),
                               "fraction": fraction, "settings": " ".join(settings)}
    models = []
    with tempfile.TemporaryDirectory(prefix="fedshare-bench-sequence-") as tmp:
        folder = data.save(Path(tmp) / "sessions")
        for mode, nodes in (("cohort", cohorts), ("per_device", data.num_sessions)):
            run = ["family=sequence", f"seq-data={folder}", "rounds=2", "eval-every=2",
                   f"fraction={fraction}", f"seed={seed}", *settings, f"num-supernodes={nodes}"]
            out, summary = run_experiment(resolve(None, run, name=f"bench-sequence-{mode}"),
                                          Path(tmp) / "runs", "flower")
            rounds = pd.read_csv(out / "metrics.csv").set_index("round")
            devices = float(rounds.loc[2, "num-users"])
            train_s = float(rounds.loc[2, "train-seconds"])
            round_s = float(rounds.loc[2, "seconds"] - rounds.loc[1, "seconds"])
            figures |= {f"{mode}_nodes": nodes, f"{mode}_devices_per_round": devices,
                        f"{mode}_train_seconds": train_s, f"{mode}_round_seconds": round_s,
                        f"{mode}_devices_per_s": devices / train_s,
                        f"{mode}_run_seconds": summary["seconds"],
                        f"{mode}_train_messages": summary["traffic"]["train"]["client_messages"]}
            models.append(np.load(out / "model.npy"))
    figures["cohort_over_per_device_train"] = (figures["per_device_train_seconds"]
                                               / figures["cohort_train_seconds"])
    figures["cohort_over_per_device_round"] = (figures["per_device_round_seconds"]
                                               / figures["cohort_round_seconds"])
    figures["modes_max_abs_diff"] = float(np.abs(models[0] - models[1]).max())
    figures["modes_agree"] = figures["modes_max_abs_diff"] <= 1e-5
    return figures
