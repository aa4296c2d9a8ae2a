"""Stop a Flower run with unlearning at seeded moments of every phase, resume it, and check it.

Each moment is a phase (the share round, a learning round, the acknowledgement of unsharing
requests, a remaining-data round of the unlearning phase), a signal to the launcher (SIGTERM,
SIGINT, SIGHUP: it stops what it started; SIGKILL: its watchdog does) and a delay after the
phase's first sign. For each moment a fresh ``fedshare run`` is stopped there, the script waits
until no process of the run is left (and says how long that took), resumes the run with
``fedshare run --resume`` and compares the result with the same run through Flower
uninterrupted: the item table to 1e-5, the interactions forgotten, every round's
``metrics.csv`` row, and ``fedshare audit``'s residue count.

Usage::

    python -m simulations.kill_moments [--moments 12] [--seed 0] [--out DIR]
                                      [--set key=value ...]

By default the run is a small one on MovieLens-100K; ``--set prepared=FOLDER`` runs on a
prepared dataset instead. The test suite runs one moment per phase on a tiny dataset
(tests/test_kill_and_resume.py) with :func:`stop_at` and :func:`resume`.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import psutil

from simulations.processes import MARKER, live, signals_interrupt

REPO_ROOT = Path(__file__).resolve().parent.parent
PHASES = ("share", "learning", "acknowledgement", "unlearning")
SIGNALS = (signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGHUP)
# the phase's first sign: a progress line of the ServerApp (learning: a committed round)
SIGNS = {"share": "share round:", "acknowledgement": "unlearning: collecting",
         "unlearning": "unlearning round"}
LONGEST_DELAY = {"share": 0.5, "learning": 1.0, "acknowledgement": 0.3, "unlearning": 0.5}
SETTINGS = ["dataset=ml-100k", "rounds=4", "eval-every=2", "fraction=0.05", "dim=16",
            "local-epochs=1", "server-steps=2", "snapshots=2", "unlearn=true",
            "unlearn-rounds=3", "unlearn-steps=2", "num-supernodes=2"]
STOPPED_WITHIN = 60.0  # seconds the run's processes may take to end after the signal


@dataclass(frozen=True)
class Moment:
    phase: str
    sig: signal.Signals
    delay: float  # seconds after the phase's first sign
    round: int = 1  # learning: the committed round to wait for

    def __str__(self) -> str:
        where = f"round {self.round}" if self.phase == "learning" else self.phase
        return f"{self.sig.name} {self.delay:.2f} s into {where}"


def draw_moments(count: int, seed: int, rounds: int) -> list[Moment]:
    """``count`` moments, the phases in turn, signal, delay and learning round drawn."""
    rng = np.random.default_rng(seed)
    moments = []
    for k in range(count):
        phase = PHASES[k % len(PHASES)]
        moments.append(Moment(phase, SIGNALS[int(rng.integers(len(SIGNALS)))],
                              float(rng.uniform(0, LONGEST_DELAY[phase])),
                              int(rng.integers(1, max(2, rounds)))))
    return moments


class Launch:
    """``fedshare run ARGS`` in a session of its own; its progress lines are collected as they
    come and its process tree is watched (:meth:`watch`) so that none of it goes unnoticed."""

    def __init__(self, args: Sequence[str]) -> None:
        self.started = time.time()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "simulations.cli", "run", *args], cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, start_new_session=True)
        self.lines: list[str] = []
        self.seen: set[psutil.Process] = set()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip())

    def watch(self) -> None:
        with contextlib.suppress(psutil.Error):
            self.seen |= set(psutil.Process(self.process.pid).children(recursive=True))

    def saw(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def left(self) -> list[str]:
        """The run's processes still alive: those seen below the launcher and any process
        started since the launch that carries the run marker."""
        alive = {p for p in self.seen if live(p)}
        for process in psutil.process_iter(["environ", "create_time"]):
            with contextlib.suppress(psutil.Error, TypeError):
                if MARKER in (process.info["environ"] or {}) and \
                        process.info["create_time"] >= self.started - 1 and live(process):
                    alive.add(process)
        return sorted(f"{p.pid} {' '.join(_cmdline(p)[:3])}" for p in alive)

    def finish(self, timeout: float) -> int:
        """Wait for the launcher to end by itself; its exit status."""
        try:
            code = self.process.wait(timeout=timeout)
        finally:
            self.kill()
        self._reader.join(timeout=10)
        return code

    def kill(self) -> None:
        """Whatever is left, at once (a failed check must not leave a run behind)."""
        if self.process.poll() is None:
            self.process.kill()
        for process in self.seen:
            with contextlib.suppress(psutil.Error):
                process.kill()


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return ["?"]


def committed_round(state: Path) -> int:
    """The last round committed to ``state`` (0 without one), read without writing."""
    if not state.exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{state}?mode=ro", uri=True,
                                            timeout=5)) as db, contextlib.suppress(sqlite3.Error):
        row = db.execute("SELECT value FROM meta WHERE key = 'round'").fetchone()
        return int(row[0]) if row else 0
    return 0


def run_folder(out_root: Path) -> Path | None:
    folders = sorted(p.parent for p in out_root.glob("*/config.toml"))
    return folders[0] if folders else None


def stop_at(launch: Launch, moment: Moment, out_root: Path, timeout: float = 900.0) -> float:
    """Signal the launcher at ``moment``; returns the seconds from the signal until no process
    of the run is left. Raises ``RuntimeError`` if the run ends first, never reaches the
    moment, or leaves processes behind for :data:`STOPPED_WITHIN` seconds."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            if launch.process.poll() is not None:
                raise RuntimeError(f"the run ended (status {launch.process.returncode}) before "
                                   f"{moment}: {launch.lines[-3:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the run did not reach {moment} in {timeout:.0f} s")
            launch.watch()
            folder = run_folder(out_root)
            if moment.phase == "learning":
                reached = folder is not None and \
                    committed_round(folder / "state.db") >= moment.round
            else:
                reached = launch.saw(SIGNS[moment.phase])
            if reached:
                break
            time.sleep(0.05)
        until = time.monotonic() + moment.delay
        while time.monotonic() < until:
            launch.watch()
            time.sleep(0.02)
        if launch.process.poll() is not None:
            raise RuntimeError(f"the run ended before {moment}")
        launch.watch()
        launch.process.send_signal(moment.sig)
        sent = time.monotonic()
        code = launch.process.wait(timeout=STOPPED_WITHIN)
        if moment.sig != signal.SIGKILL and code != 130:  # 128 + SIGINT: "interrupted"
            raise RuntimeError(f"{moment}: the launcher exited with {code}, not 130")
        while launch.left() and time.monotonic() < sent + STOPPED_WITHIN:
            time.sleep(0.2)
        if launch.left():
            raise RuntimeError(f"{moment}: still running {STOPPED_WITHIN:.0f} s after the "
                               f"signal: {launch.left()}")
        return time.monotonic() - sent
    finally:
        launch.kill()


def resume(folder: Path, sets: Sequence[str] = (), timeout: float = 1800.0) -> None:
    """``fedshare run --resume folder`` to its end; raises ``RuntimeError`` if it fails."""
    launch = Launch(["--resume", str(folder), *[a for s in sets for a in ("--set", s)]])
    code = launch.finish(timeout)
    if code != 0:
        raise RuntimeError(f"the resumed run failed ({code}): {launch.lines[-5:]}")


def reference(run: dict) -> tuple[np.ndarray, int]:
    """The uninterrupted run's item table and forgotten interactions, in process."""
    import torch

    from fedshare.runconfig import data_key, federated_config, load_data, unlearning_config
    from fedshare.unlearning.phase import learn, unlearn

    torch.set_num_threads(1)
    data = load_data(data_key(run, {}))
    config = federated_config(run)
    learned = learn(data, config)
    unlearning = unlearning_config(run)
    assert unlearning is not None, "the run must unlearn (unlearn=true)"
    outcome = unlearn(learned, data, "fedshare", unlearning, config.rounds)
    return outcome.federation.server.table.numpy(), int(data.plan.unlearn.sum())


@dataclass
class Check:
    table_gap: float  # largest |resumed - uninterrupted| of the item table
    forgotten: bool  # the summary counts every interaction the plan unshares
    rows: bool  # metrics.csv has one row per learning round and every due validation
    residue: int  # what `fedshare audit` found

    @property
    def passed(self) -> bool:
        return self.table_gap <= 1e-5 and self.forgotten and self.rows and self.residue == 0


def check(folder: Path, expected: tuple[np.ndarray, int]) -> Check:
    """The finished run in ``folder`` against the uninterrupted ``expected``."""
    import json
    import tomllib

    from fedshare.runconfig import data_key, federated_config, load_data
    from fedshare.unlearning.residue import GroundTruth, audit_run

    run = tomllib.loads((folder / "config.toml").read_text())
    config = federated_config(run)
    table, forgotten = expected
    summary = json.loads((folder / "summary.json").read_text())
    metrics = pd.read_csv(folder / "metrics.csv")
    validated = [r for r in range(1, config.rounds + 1)
                 if r % config.eval_every == 0 or r == config.rounds]
    rows = metrics["round"].tolist() == list(range(1, config.rounds + 1)) and \
        metrics.loc[metrics["round"].isin(validated), "valid_hr@20"].notna().all()
    residue = sum(f.found for f in audit_run(folder, GroundTruth.from_plan(
        load_data(data_key(run, {})))))
    gap = float(np.abs(np.load(folder / "item_table.npy") - table).max())
    return Check(gap, summary.get("forgotten_interactions") == forgotten, bool(rows),
                 residue)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.kill_moments",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--moments", type=int, default=12, help="how many (default 12)")
    parser.add_argument("--seed", type=int, default=0, help="draws the moments")
    parser.add_argument("--out", help="where the runs go (default: a temporary folder)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a run setting on top of the script's small run")
    args = parser.parse_args(argv)
    with signals_interrupt():  # stopped itself, it stops the run it is testing
        return _run_moments(args)


def _run_moments(args: argparse.Namespace) -> int:
    from simulations.experiment import resolve

    sets = [*SETTINGS, *args.set]
    experiment = resolve(None, sets)
    moments = draw_moments(args.moments, args.seed, experiment.config.rounds)
    results = []
    with tempfile.TemporaryDirectory(prefix="fedshare-kill-") as tmp:
        root = Path(args.out or tmp)
        # the reference: the same run through Flower, never stopped (and how far the in-process
        # engine is from it, for the record)
        whole = Launch(["--out", str(root / "uninterrupted"),
                        *[a for s in sets for a in ("--set", s)]])
        if whole.finish(1800) != 0:
            raise SystemExit(f"the uninterrupted run failed: {whole.lines[-5:]}")
        folder = run_folder(root / "uninterrupted")
        assert folder is not None
        inprocess = reference(experiment.run)
        expected = (np.load(folder / "item_table.npy"), inprocess[1])
        print(f"uninterrupted run: in-process engine within "
              f"{np.abs(expected[0] - inprocess[0]).max():.1e} of it", flush=True)
        for k, moment in enumerate(moments):
            out_root = root / f"moment-{k:02d}"
            row: dict = {"moment": k, "phase": moment.phase, "signal": moment.sig.name,
                         "delay_s": round(moment.delay, 2)}
            try:
                row["stopped_s"] = round(stop_at(Launch(
                    ["--out", str(out_root), *[a for s in sets for a in ("--set", s)]]),
                    moment, out_root), 1)
                folder = run_folder(out_root)
                assert folder is not None
                row["committed"] = committed_round(folder / "state.db")
                resume(folder)
                result = check(folder, expected)
                row |= {"table_gap": f"{result.table_gap:.1e}", "rows": result.rows,
                        "forgotten": result.forgotten, "residue": result.residue,
                        "ok": result.passed}
            except RuntimeError as exc:
                row |= {"ok": False, "error": str(exc)[:200]}
            results.append(row)
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    frame = pd.DataFrame(results)
    print(frame.to_string(index=False))
    ok = int(frame["ok"].sum())
    print(f"{ok} of {len(frame)} moments: no process left, resumed run equal to the "
          "uninterrupted one (1e-5), nothing left to audit")
    return 0 if ok == len(frame) else 1


if __name__ == "__main__":
    sys.exit(main())
