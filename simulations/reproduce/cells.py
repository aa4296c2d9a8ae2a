"""Cells: the unit of work of ``fedshare reproduce``, run on a small pool, kept on disk, resumed.

A cell is one call of a module-level function with JSON arguments (a learning run, one seed's
unlearning methods, a CAU method on one model). Its result (a JSON object) is written atomically
to ``cells/<key>.json`` when it finishes, so a finished cell is never recomputed: a second run
on the same folder (``--resume``), or one stopped by Ctrl-C, picks up with the cells that are not
there. A cell may depend on others (the reported runs on the settings the tuning cells chose):
its arguments are built from their results just before it is submitted.

Why a scheduler of our own and not Ray: the cells are CPU-bound processes on one machine, run a
few at a time; a :class:`~concurrent.futures.ProcessPoolExecutor` (through
:func:`simulations.processes.worker_pool`, which ends its workers on Ctrl-C) is all it takes, and
the ordering (critical path first, among the cells whose inputs exist) keeps two cores busy.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from fedshare.atomic import write_json
from fedshare.errors import FedShareError
from simulations.processes import worker_pool

Args = dict[str, Any]


@dataclass(frozen=True)
class Cell:
    """One unit of work.

    Args:
        key: unique, file-name safe (``learn-fedshare-s0``); its result is ``cells/<key>.json``.
        fn: ``"module:function"``, called as ``fn(**args)`` in a worker; returns a JSON object.
        args: the arguments, or a base that ``build`` completes.
        cost: estimated seconds on one core (the progress bar's estimate and the ordering).
        deps: keys of the cells whose results ``build`` needs.
        build: ``build(args, results_of_deps) -> args``, run in the scheduler, not the worker.
    """

    key: str
    fn: str
    args: Args = field(default_factory=dict)
    cost: float = 1.0
    deps: tuple[str, ...] = ()
    build: Callable[[Args, Mapping[str, dict]], Args] | None = None


def call(fn: str, args: Args) -> dict:
    """Run one cell in a worker (a module-level function: the pool pickles only names)."""
    import importlib

    module, _, name = fn.partition(":")
    return getattr(importlib.import_module(module), name)(**args)


def load_done(folder: Path) -> dict[str, dict]:
    """Every finished cell of ``folder`` (what a resumed run does not compute again)."""
    done = {}
    for path in sorted((folder / "cells").glob("*.json")):
        done[path.stem] = json.loads(path.read_text())
    return done


class Progress:
    """One line per finished cell, and on a terminal a bar redrawn in place: cells done,
    elapsed and an estimate of what is left (the remaining cells' estimated cost at the speed
    measured so far)."""

    def __init__(self, cells: Sequence[Cell], done: Mapping[str, dict],
                 stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.cost = {c.key: c.cost for c in cells}
        self.total = len(cells)
        self.finished = sum(1 for c in cells if c.key in done)
        self.left = sum(c.cost for c in cells if c.key not in done)
        self.measured = 0.0  # estimated cost of the cells finished by this run
        self.started = time.perf_counter()
        self.tty = self.stream.isatty()

    def remaining(self) -> float | None:
        elapsed = time.perf_counter() - self.started
        if self.measured <= 0:
            return None
        return self.left * elapsed / self.measured

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        width = 30
        filled = int(width * self.finished / max(self.total, 1))
        left = self.remaining()
        eta = "?" if left is None else _clock(left)
        return (f"[{'#' * filled}{'.' * (width - filled)}] {self.finished}/{self.total} cells  "
                f"elapsed {_clock(elapsed)}  left ~{eta}")

    def cell_done(self, key: str, seconds: float) -> None:
        self.finished += 1
        self.left -= self.cost[key]
        self.measured += self.cost[key]
        end = "\r" if self.tty else "\n"
        text = f"{key} ({seconds:.0f} s)"
        if self.tty:
            self.stream.write("\r\033[K" + f"{text}\n" + self.line() + end)
        else:
            self.stream.write(f"{self.line()}  {text}{end}")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def check_cells(cells: Sequence[Cell]) -> None:
    keys = [c.key for c in cells]
    if len(set(keys)) != len(keys):
        raise FedShareError("two cells share a key")
    known = set(keys)
    for cell in cells:
        missing = [d for d in cell.deps if d not in known]
        if missing:
            raise FedShareError(f"cell {cell.key} depends on unknown {missing[0]}")
    placed: set[str] = set()
    waiting = list(cells)
    while waiting:  # Kahn's order: what is never placed waits on itself
        ready = [c for c in waiting if all(d in placed for d in c.deps)]
        if not ready:
            raise FedShareError("cells wait on each other: "
                                + ", ".join(c.key for c in waiting))
        placed.update(c.key for c in ready)
        waiting = [c for c in waiting if c.key not in placed]


def ranks(cells: Sequence[Cell]) -> dict[str, float]:
    """A cell's cost plus the longest chain of cells waiting on it: submitting the highest
    rank first starts the tuning that the reported runs wait for before the long independent
    cells (a list schedule by critical path)."""
    after: dict[str, list[str]] = {c.key: [] for c in cells}
    for cell in cells:
        for dep in cell.deps:
            after[dep].append(cell.key)
    cost = {c.key: c.cost for c in cells}
    rank: dict[str, float] = {}

    def visit(key: str) -> float:
        if key not in rank:
            rank[key] = cost[key] + max((visit(k) for k in after[key]), default=0.0)
        return rank[key]

    for cell in cells:
        visit(cell.key)
    return rank


def run_cells(folder: Path, cells: Sequence[Cell], workers: int = 2,
              stream: TextIO | None = None) -> dict[str, dict]:
    """Run every cell of ``cells`` not yet in ``folder/cells`` (dependencies first, then the
    highest :func:`ranks`) on ``workers`` processes; return every cell's result.

    A cell that raises stops the run with its error (the finished cells stay on disk);
    Ctrl-C ends the workers at once (:func:`worker_pool`) and keeps what finished.
    """
    check_cells(cells)
    rank = ranks(cells)
    by_key = {c.key: c for c in cells}
    done = {k: v for k, v in load_done(folder).items() if k in by_key}
    progress = Progress(cells, done, stream)
    todo = [c for c in cells if c.key not in done]
    if not todo:
        return done
    running: dict[Future, tuple[Cell, float]] = {}
    with worker_pool(max(1, workers)) as pool:
        while todo or running:
            ready = sorted((c for c in todo if all(d in done for d in c.deps)),
                           key=lambda c: -rank[c.key])
            for cell in ready[:max(0, workers - len(running))]:
                args = cell.build(dict(cell.args), {d: done[d] for d in cell.deps}) \
                    if cell.build else cell.args
                running[pool.submit(call, cell.fn, args)] = (cell, time.perf_counter())
                todo.remove(cell)
            if not running:
                raise FedShareError("cells wait on each other: "
                                    + ", ".join(c.key for c in todo))
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                cell, started = running.pop(future)
                result = future.result()  # a failed cell stops the run here
                write_json(folder / "cells" / f"{cell.key}.json", result)
                done[cell.key] = result
                progress.cell_done(cell.key, time.perf_counter() - started)
    progress.close()
    return done
