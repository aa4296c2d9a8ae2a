"""Speed and memory at MovieLens-1M scale: ``python -m simulations.bench [--quick] [--out F]``.

Prints every figure and checks none of them: timings depend on the machine (the targets are for
2 CPU cores, no GPU) and never belong in unit tests. Figures:

* client updates per second (one update = one user's local training of one round), with the
  same users, start table and code (:meth:`ClientPopulation.train`) run once as one cohort and
  once one call per user, which is what one Flower node per user does; per-user mode times a
  random sample of users and extrapolates, as timing all 6,040 of them one by one would take
  minutes. The users' trained embeddings must agree between the two modes.
* the same through the Flower app (Ray virtual SuperNodes, messages included): two nodes
  serving cohorts against one SuperNode per user, on a 1,000-user dataset of the same shape,
  timed over a round's train phase (train messages sent to every reply in), with the whole
  round beside it;
* server LightGCN propagation (L = 3) over all training interactions against PyG's
  ``LightGCN.get_embedding(edge_index)`` with the same weights, outputs compared.
* one learning round of FedShare with every user participating (fraction 1), split into
  clients + aggregation and server refinement.
* a complete learn, unshare, unlearn run (in process, default settings) at that scale: wall time
  of each phase and peak resident memory;
* FedShare's unlearning wall time over Retrain's at the ML-100K defaults (same learned model,
  same requests);
* the README's main job (``make demo``'s commands) on ML-100K: wall time and the peak of the
  summed resident memory of its process tree (the Flower run's SuperLink, ServerApp, Ray
  workers), sampled every 0.2 s, as RSS (shared pages counted in every process) and PSS
  (shared pages split);
* the sequence family's Flower round, two cohort nodes against one node per device on ML-100K's
  sessions (:mod:`simulations.bench_sequence`);
* peak resident memory after each part.

Data: real ML-1M when ``--path`` (or the download cache) has ``ratings.dat``, else the seeded
synthetic ML-1M of :mod:`fedshare.data.synthetic`; the figures say which.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import signal
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedshare.data.download import cache_dir
from fedshare.data.prepared import PreparedData, prepare
from fedshare.data.synthetic import synthetic_prepared
from fedshare.federated.config import FederatedConfig
from fedshare.federated.population import ClientPopulation
from fedshare.models.embeddings import xavier_table
from simulations.bench_sequence import sequence_flower_modes
from simulations.processes import die_with_parent, signal_group, tree_memory

QUICK_SIZE = {"num_users": 600, "num_items": 1500, "num_interactions": 60_000}


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def environment() -> dict[str, Any]:
    """What the figures were measured on: cores, threads, load, versions."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    versions = {name: importlib.metadata.version(name)
                for name in ("torch", "torch_geometric", "flwr", "numpy", "numba")}
    return {"cpu_count": os.cpu_count(), "usable_cores": affinity,
            "torch_threads": torch.get_num_threads(), "cuda_used": False,
            "load_average_1m": round(os.getloadavg()[0], 2), "python": platform.python_version(),
            **versions}


def load_data(path: str | None, quick: bool, seed: int) -> tuple[PreparedData, dict[str, Any]]:
    """Real ML-1M if ``path`` (or the cache) has it, else the synthetic stand-in; never downloads.

    ``quick`` always uses a small synthetic dataset.
    """
    start = time.perf_counter()
    where = Path(path) if path else cache_dir() / "ml-1m"
    ratings = where / "ratings.dat" if where.is_dir() else where
    if not quick and ratings.is_file():
        data, source = prepare("ml-1m", where), f"real ML-1M ({ratings})"
    else:
        size = QUICK_SIZE if quick else {}
        data = synthetic_prepared(**size, seed=seed)
        source = (f"synthetic ML-1M shape (fedshare.data.synthetic, seed {seed})"
                  + (", quick size" if quick else "")
                  + (f"; no ratings.dat at {where}" if path and not quick else ""))
    train = data.split.train
    return data, {"data": source, "users": data.num_users, "items": data.num_items,
                  "rated_items": int((train.item_degrees() > 0).sum()),
                  "interactions": len(train) + len(data.split.valid) + len(data.split.test),
                  "train_interactions": len(train),
                  "load_seconds": time.perf_counter() - start}


def client_throughput(data: PreparedData, config: FederatedConfig, per_user_sample: int = 200,
                      seed: int = 0) -> dict[str, Any]:
    """Local-training updates per second, one cohort call vs one call per user, same run."""
    cohort = ClientPopulation(data, np.arange(data.num_users), config.dim, config.seed,
                              shares=config.shares)
    alone = ClientPopulation(data, np.arange(data.num_users), config.dim, config.seed,
                             shares=config.shares)
    table = xavier_table(data.num_items, config.dim, torch.Generator().manual_seed(config.seed))
    users = cohort.trainable()
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(users, size=min(per_user_sample, len(users)), replace=False))
    warm = np.setdiff1d(users, sample)[:1]
    if len(warm):
        alone.train(warm, table, config.local, config.seed, 1)  # first-call costs, not timed

    start = time.perf_counter()
    cohort.train(users, table, config.local, config.seed, 1)
    cohort_s = time.perf_counter() - start
    start = time.perf_counter()
    for user in sample:
        alone.train(np.array([user]), table, config.local, config.seed, 1)
    alone_s = time.perf_counter() - start

    rows = np.searchsorted(cohort.users, sample)
    diff = float((cohort.embeddings[rows] - alone.embeddings[rows]).abs().max())
    cohort_rate, alone_rate = len(users) / cohort_s, len(sample) / alone_s
    return {"users": len(users), "local_interactions": int(cohort.local_count(users).sum()),
            "local_epochs": config.local_epochs, "dim": config.dim,
            "cohort_seconds": cohort_s, "cohort_updates_per_s": cohort_rate,
            "per_user_sample": len(sample), "per_user_sample_seconds": alone_s,
            "per_user_updates_per_s": alone_rate,
            "per_user_extrapolated_seconds": len(users) / alone_rate,
            "cohort_speedup": cohort_rate / alone_rate,
            "modes_agree": diff <= 1e-4, "modes_max_abs_diff": diff}


def _timed_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> tuple[float, float]:
    """Median and minimum of ``repeats`` timed calls after ``warmup`` untimed ones, in ms.

    The minimum is what a quiet machine gives; the median is the figure, unless other processes
    share the cores (OpenMP threads then wait for each other at every parallel region).
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), 1e3 * min(times)


def propagation(data: PreparedData, dim: int = 32, num_layers: int = 3, repeats: int = 10,
                seed: int = 0) -> dict[str, Any]:
    """:meth:`BipartiteGraph.propagate` over all training edges vs PyG's LightGCN, same run."""
    from torch_geometric.nn.models import LightGCN

    from fedshare.graph import BipartiteGraph

    train = data.split.train
    start = time.perf_counter()
    graph = BipartiteGraph(train)
    build_s = time.perf_counter() - start
    num_nodes = train.num_users + train.num_items
    x = torch.randn(num_nodes, dim, generator=torch.Generator().manual_seed(seed))
    users, items = x[: train.num_users], x[train.num_users:]
    model = LightGCN(num_nodes, dim, num_layers)
    edge_index = train.bipartite_edge_index()
    with torch.no_grad():
        model.embedding.weight.copy_(x)
        ours = torch.cat(graph.propagate(users, items, num_layers))
        theirs = model.get_embedding(edge_index)
        ours_ms, ours_min = _timed_ms(lambda: graph.propagate(users, items, num_layers), repeats)
        pyg_ms, pyg_min = _timed_ms(lambda: model.get_embedding(edge_index), repeats)

    users_g, items_g = users.clone().requires_grad_(), items.clone().requires_grad_()

    def forward_backward() -> None:
        u, i = graph.propagate(users_g, items_g, num_layers)
        (u.sum() + i.sum()).backward()

    grad_ms, _ = _timed_ms(forward_backward, max(1, repeats // 2))
    return {"nodes": num_nodes, "edges": 2 * len(train), "dim": dim, "layers": num_layers,
            "graph_build_ms": 1e3 * build_s, "fedshare_ms": ours_ms, "fedshare_min_ms": ours_min,
            "pyg_lightgcn_ms": pyg_ms, "pyg_lightgcn_min_ms": pyg_min,
            "pyg_over_fedshare": pyg_ms / ours_ms, "fedshare_forward_backward_ms": grad_ms,
            "outputs_agree": bool(torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5)),
            "outputs_max_abs_diff": float((ours - theirs).abs().max())}


def learning_round(data: PreparedData, config: FederatedConfig) -> dict[str, Any]:
    """One round of Algorithm 1 with every user sampled: clients + aggregation, then server.

    A round of a run, not a process's first: the numba kernels are loaded beforehand (once per
    process, timed apart)."""
    from fedshare.federated.inprocess import InProcessFederation
    from fedshare.kernels import warm_up

    config = replace(config, fraction=1.0)
    start = time.perf_counter()
    warm_up()
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    federation = InProcessFederation(data, config)
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    aggregated, entered = federation.learning.local_view(1, federation.client_updates(1))
    clients_s = time.perf_counter() - start
    start = time.perf_counter()
    federation.server.finish_round(aggregated, 1)
    server_s = time.perf_counter() - start
    return {"variant": config.variant, "users_trained": sum(u.num_users for u in entered),
            "shared_edges": len(federation.server.shared), "server_steps": config.server_steps,
            "kernel_load_seconds": load_s, "setup_seconds": setup_s,
            "clients_and_aggregation_seconds": clients_s,
            "server_refinement_seconds": server_s, "round_seconds": clients_s + server_s}


def flower_modes(num_users: int = 1_000, seed: int = 0) -> dict[str, Any]:
    """Client updates per second through the Flower app: two cohort nodes against one node per
    user, same data and seed (synthetic, ``num_users`` users with ML-1M's degree shape: one
    SuperNode per user for all 6,040 would spend minutes on the share and evaluate messages
    alone). Every trainable user trains in each round (fraction 1). Client updates per second
    are timed over the second round's train phase, from sending the train messages to holding
    every reply (messages, scheduling and local training: what the clients cost); the whole
    round (plus aggregation, the server's refinement and the durable commit, the same work in
    both modes) is reported beside it. Plain train replies (``defence=none``): SecAgg+'s cost is
    in a secure run's ``secagg.json`` and metrics columns."""
    import pandas as pd

    from simulations.experiment import resolve, run_experiment

    scale = num_users / 6_040
    data = synthetic_prepared(num_users, max(200, int(3_706 * scale ** 0.5)),
                              int(1_000_209 * scale), seed=seed)
    figures: dict[str, Any] = {"users": num_users}
    with tempfile.TemporaryDirectory(prefix="fedshare-bench-flower-") as tmp:
        folder = data.save(Path(tmp) / "data")
        for mode, nodes in (("cohort", 2), ("per_user", num_users)):
            settings = [f"prepared={folder}", "rounds=3", "eval-every=3", "fraction=1.0",
                        f"seed={seed}", f"num-supernodes={nodes}", "defence=none"]
            out, _ = run_experiment(resolve(None, settings, name=f"bench-{mode}"),
                                    Path(tmp) / "runs", "flower")
            rounds = pd.read_csv(out / "metrics.csv").set_index("round")
            users = float(rounds.loc[2, "num-users"])
            train_s = float(rounds.loc[2, "train-seconds"])
            round_s = float(rounds.loc[2, "seconds"] - rounds.loc[1, "seconds"])
            figures[f"{mode}_nodes"] = nodes
            figures[f"{mode}_train_seconds"] = train_s
            figures[f"{mode}_updates_per_s"] = users / train_s
            figures[f"{mode}_round_seconds"] = round_s
            figures[f"{mode}_server_seconds"] = float(rounds.loc[2, "server-seconds"])
            figures[f"{mode}_round_updates_per_s"] = users / round_s
    figures["cohort_over_per_user"] = (figures["cohort_updates_per_s"]
                                       / figures["per_user_updates_per_s"])
    figures["cohort_over_per_user_whole_round"] = (figures["cohort_round_updates_per_s"]
                                                   / figures["per_user_round_updates_per_s"])
    return figures


def full_run(data: PreparedData, config: FederatedConfig) -> dict[str, Any]:
    """Learn, let the planned users unshare, unlearn with FedShare (Algorithm 2), in process."""
    from fedshare.unlearning.config import UnlearningConfig
    from fedshare.unlearning.phase import learn, unlearn

    start = time.perf_counter()
    learned = learn(data, config)
    learn_s = time.perf_counter() - start
    outcome = unlearn(learned, data, "fedshare", UnlearningConfig(), config.rounds)
    test = outcome.federation.evaluate("test")
    return {"rounds": config.rounds, "fraction": config.fraction,
            "unshared_interactions": int(data.plan.unlearn.sum()),
            "learn_seconds": learn_s, "unshare_and_unlearn_seconds": outcome.seconds,
            "total_seconds": time.perf_counter() - start,
            "test_hr@20_after_unlearning": test["hr@20"],
            "test_ndcg@20_after_unlearning": test["ndcg@20"]}


def unlearning_ratio(config: FederatedConfig) -> dict[str, Any]:
    """FedShare unlearning time / Retrain time at the ML-100K defaults, with one torch thread
    (as ``fedshare unlearning-table`` runs) and with the bench's threads."""
    threads = torch.get_num_threads()
    figures: dict[str, Any] = {}
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        try:
            figures.update({f"{k}_{n}_thread{'s' if n > 1 else ''}": v
                            for k, v in _unlearning_ratio(config).items()})
        finally:
            torch.set_num_threads(threads)
    return figures


def _unlearning_ratio(config: FederatedConfig) -> dict[str, Any]:
    from fedshare.runconfig import data_key, load_data
    from fedshare.unlearning.config import UnlearningConfig
    from fedshare.unlearning.phase import learn, unlearn
    from simulations.experiment import resolve

    experiment = resolve(Path(__file__).parent / "configs" / "fedshare.toml",
                         [f"seed={config.seed}"])
    data = load_data(data_key(experiment.run, {}))
    learned = learn(data, experiment.config)
    runs = [unlearn(learned, data, "fedshare", UnlearningConfig(), experiment.config.rounds)
            for _ in range(3)]  # seconds-long: the median of three steadies the figure
    fedshare = sorted(runs, key=lambda o: o.seconds)[1]
    retrain = unlearn(learned, data, "retrain", UnlearningConfig(), experiment.config.rounds)
    return {"fedshare_seconds": fedshare.seconds,
            "fedshare_seconds_each": [o.seconds for o in runs],
            "retrain_seconds": retrain.seconds,
            "fedshare_over_retrain": fedshare.seconds / retrain.seconds,
            "fedshare_test_hr@20": fedshare.federation.evaluate("test")["hr@20"],
            "retrain_test_hr@20": retrain.federation.evaluate("test")["hr@20"]}


MAIN_JOB = (["fedshare", "data", "stats", "--dataset", "ml-100k"],
            ["fedshare", "run", "--config", "simulations/configs/fedshare.toml",
             "--set", "unlearn=true"],
            ["fedshare", "unlearning-table", "--seeds", "0"],
            ["fedshare", "storage"])
"""The README's main job (``make demo`` runs exactly these)."""


def main_job(out: Path, commands: Sequence[Sequence[str]] = MAIN_JOB) -> dict[str, Any]:
    """Run the main job's commands one after the other; wall time and peak tree memory."""
    import subprocess
    import sys

    bin_dir = Path(sys.executable).parent
    root = Path(__file__).resolve().parent.parent
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {}
    peak, peak_pss, start = 0, 0, time.perf_counter()
    for command in commands:
        argv = [str(bin_dir / command[0]), *command[1:]]
        if command[1] in ("run", "unlearning-table", "storage"):
            argv += ["--out", str(out)]
        began, own_peak, own_pss = time.perf_counter(), 0, 0
        with open(out / "main-job.log", "a") as log:
            # killed outright, the bench leaves the command a SIGTERM: it stops what it started
            process = subprocess.Popen(argv, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True,
                                       preexec_fn=partial(die_with_parent, signal.SIGTERM))
            try:
                while process.poll() is None:
                    memory = tree_memory(process.pid)
                    own_peak, own_pss = max(own_peak, memory.rss), max(own_pss, memory.pss)
                    time.sleep(0.2)
            finally:  # interrupted: stop the command and everything it started
                signal_group(process, signal.SIGTERM)
                process.wait()
        if process.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed; see {out / 'main-job.log'}")
        name = " ".join(command[1:3] if command[1] == "data" else command[1:2])
        figures[f"{name}_seconds"] = time.perf_counter() - began
        figures[f"{name}_peak_rss_mb"] = own_peak / 2**20
        figures[f"{name}_peak_pss_mb"] = own_pss / 2**20
        peak, peak_pss = max(peak, own_peak), max(peak_pss, own_pss)
    figures.update({"wall_seconds": time.perf_counter() - start,
                    "peak_tree_rss_mb": peak / 2**20, "peak_tree_pss_mb": peak_pss / 2**20})
    return figures


def _main_job_in_temp() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fedshare-main-job-") as tmp:
        return main_job(Path(tmp))


def _print_section(title: str, figures: dict[str, Any]) -> None:
    print(f"\n== {title}", flush=True)
    for key, value in figures.items():
        text = f"{value:,.3f}" if isinstance(value, float) else str(value)
        print(f"  {key:32s} {text}", flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``fedshare bench`` (and ``python -m simulations.bench``)."""
    parser.add_argument("--path", help="ML-1M folder or ratings.dat (else the cache, else "
                                       "synthetic data)")
    parser.add_argument("--quick", action="store_true",
                        help="a small synthetic dataset; skips the Flower and ML-100K parts")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--dim", type=int, default=FederatedConfig().dim)
    parser.add_argument("--per-user-sample", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=10, help="timed propagation calls")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["clients", "flower", "propagation", "round", "full-run",
                                 "ratio", "main-job", "sequence-flower"])
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Measure and print every figure not skipped."""
    if args.quick:
        args.skip = [*args.skip, "flower", "ratio", "main-job", "sequence-flower"]
    if args.threads:
        torch.set_num_threads(args.threads)
    config = FederatedConfig(dim=args.dim, seed=args.seed)
    figures: dict[str, dict[str, Any]] = {"environment": environment()}
    _print_section("environment", figures["environment"])
    data, figures["data"] = load_data(args.path, args.quick, args.seed)
    figures["data"]["peak_rss_mb"] = peak_rss_mb()
    _print_section("data", figures["data"])
    parts = {
        "clients": ("client_throughput", lambda: client_throughput(
            data, config, args.per_user_sample, args.seed)),
        "flower": ("flower_cohort_vs_per_user", lambda: flower_modes(1_000, args.seed)),
        "propagation": ("propagation", lambda: propagation(
            data, args.dim, config.num_layers, args.repeats, args.seed)),
        "round": ("learning_round", lambda: learning_round(data, config)),
        "full-run": ("full_run", lambda: full_run(data, config)),
        "ratio": ("unlearning_ratio_ml100k", lambda: unlearning_ratio(config)),
        "main-job": ("main_job_ml100k", _main_job_in_temp),
        "sequence-flower": ("sequence_flower_cohort_vs_per_device",
                            lambda: sequence_flower_modes(seed=args.seed)),
    }
    for key, (title, measure) in parts.items():
        if key in args.skip:
            continue
        start = time.perf_counter()
        figures[title] = measure()
        figures[title]["section_seconds"] = time.perf_counter() - start
        figures[title]["peak_rss_mb"] = peak_rss_mb()
        _print_section(title, figures[title])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2, default=str) + "\n")
        print(f"\nfigures written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
