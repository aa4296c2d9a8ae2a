"""``fedshare reproduce TARGET``: run a target's cells in a results folder, then write its CSVs,
figures and ``report.md``.

The folder is the unit of resumption: ``design.json`` records what it was made for (a folder
is resumed only with the same target, dataset, seeds and ``--quick``), ``cells/`` what is
finished, ``sessions.json`` how long each sitting took. Outputs are rewritten from the cells
at the end of every sitting, so a resumed folder's report covers everything finished.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import TextIO

from fedshare.atomic import write_json
from fedshare.errors import FedShareError
from fedshare.run_lease import RunLease
from simulations.experiment import new_folder
from simulations.reproduce.cells import run_cells
from simulations.reproduce.plan import Design, build_cells
from simulations.reproduce.tables import chosen_record, frames, write_frames

PROTOCOL = {
    "split": "random 8:1:1 split of each dataset's interactions into train, validation and "
             "test (FedShare Sec. V-A); CAU: 8:1:1 of sessions (devices), 5-core filtered",
    "filtering": "users with fewer than the paper's minimum interactions removed (20 for "
                 "MovieLens and Fashion, 10 for Video Games); ratings made implicit",
    "ranking": "full ranking over every item the user has not interacted with in training; "
               "HR@20 and NDCG@20 averaged over every test user (CAU: Recall/NDCG@10/20 over "
               "every prediction point of the test devices, Hit_u over the forget samples)",
    "seeds": "reported seed s = split seed s, sharing plan seed s, model seed s",
    "tuning": "settings chosen on validation on the tuning plans only, the same number of "
              "candidates for every tuned method (simulations/reproduce/plan.py)",
    "cau": "fedshare cau-table's settings (batch 16, the paper's epochs, FedAdam 300 rounds), "
           "except that the Original and Retrain train each round's sampled devices as one "
           "batch (seq-batched: FedAvg's update of one local SGD step, dropout drawn per batch): "
           "Retrain's seconds are those of that vectorised simulation; device by device "
           "(fedshare cau-table) Retrain takes 5-10x longer",
}


def check_data(design: Design) -> None:
    """Fail on bad data (a missing file, an unknown dataset) before a folder is made."""
    from simulations.reproduce.work import experiment, plan

    if design.target != "cau":
        plan(experiment("fedshare", 0, design.sets), 0, 0)
    if design.target in ("cau", "all"):
        from fedshare.sequences.data import prepare_sequences

        prepare_sequences(design.dataset, design.data_path, max_len=50, split_seed=0)


def open_folder(out: str | Path, resume: str | Path | None, design: Design) -> Path:
    if resume is None:
        folder = new_folder(out, f"reproduce-{design.target}")
        write_json(folder / "design.json", design.record())
        return folder
    folder = Path(resume).resolve()
    recorded = folder / "design.json"
    if not recorded.is_file():
        raise FedShareError(f"{folder} is not a reproduce folder (no design.json)")
    if json.loads(recorded.read_text()) != design.record():
        raise FedShareError(f"{folder} was made for {json.loads(recorded.read_text())}; resume "
                            "it with the same target, --dataset, --path, --seeds and --quick")
    return folder


def reproduce(design: Design, out: str | Path = "runs", resume: str | Path | None = None,
              workers: int = 2, stream: TextIO | None = None,
              command: str = "") -> Path:
    """Run (or finish) ``design``'s cells; write the CSVs, figures and report; return the
    folder."""
    if workers < 1:
        raise FedShareError(f"--workers must be >= 1, got {workers}")
    if resume is None:
        check_data(design)
    folder = open_folder(out, resume, design)
    stream = stream or sys.stderr
    stream.write(f"results in {folder}\n")
    with RunLease(folder):
        sessions_path = folder / "sessions.json"
        sessions = json.loads(sessions_path.read_text())["sessions"] \
            if sessions_path.is_file() else []
        started, start = time.strftime("%Y-%m-%d %H:%M:%S"), time.perf_counter()
        cells = build_cells(design, folder)
        try:
            results = run_cells(folder, cells, workers, stream)
        finally:
            sessions.append({"started": started, "seconds": time.perf_counter() - start,
                             "command": command})
            write_json(sessions_path, {"sessions": sessions})
        write_outputs(folder, design, results, sessions, len(cells))
    return folder


def write_outputs(folder: Path, design: Design, results: dict, sessions: list[dict],
                  cells: int) -> None:
    from simulations.reproduce.figures import draw_all
    from simulations.reproduce.report import write_report

    write_frames(folder, frames(results))
    write_json(folder / "chosen.json", chosen_record(design, results))
    write_json(folder / "manifest.json", {
        **design.record(), "command": sessions[-1]["command"] if sessions else "",
        "tuning_plans": [f"{a}:{b}" for a, b in design.tuning_plans]
        if design.target != "cau" else [],
        "reported_plans": [f"{s}:{s}" for s in range(design.seeds)],
        "protocol": PROTOCOL, "elapsed_seconds": sum(s["seconds"] for s in sessions),
        "sessions": len(sessions), "cells": cells, "started": sessions[0]["started"],
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.machine()}, {_cores()} cores, Python "
                   f"{platform.python_version()}"})
    draw_all(folder)
    write_report(folder)


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        os.cpu_count() or 1

