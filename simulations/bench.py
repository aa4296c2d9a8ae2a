"""Speed and memory at MovieLens-1M scale: ``python -m simulations.bench [--quick] [--out F]``.

Prints every figure and checks none of them: timings depend on the machine (the targets are for
2 CPU cores, no GPU) and never belong in unit tests. Figures:

* client updates per second (one update = one user's local training of one round), with the
  same users, start table and code (:meth:`ClientPopulation.train`) run once as one cohort and
  once one call per user, which is what one Flower node per user does; per-user mode times a
  random sample of users and extrapolates, as timing all 6,040 of them one by one would take
  minutes. The users' trained embeddings must agree between the two modes.
* server LightGCN propagation (L = 3) over all training interactions against PyG's
  ``LightGCN.get_embedding(edge_index)`` with the same weights, outputs compared.
* one learning round of FedShare with every user participating (fraction 1), split into
  clients + aggregation and server refinement.
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
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch_geometric.nn.models import LightGCN

from fedshare.data.download import cache_dir
from fedshare.data.prepared import PreparedData, prepare
from fedshare.data.synthetic import synthetic_prepared
from fedshare.federated.config import FederatedConfig
from fedshare.federated.population import ClientPopulation
from fedshare.federated.simulate import InProcessFederation
from fedshare.graph import BipartiteGraph
from fedshare.models.embeddings import xavier_table

QUICK_SIZE = {"num_users": 600, "num_items": 1500, "num_interactions": 60_000}


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def environment() -> dict[str, Any]:
    """What the figures were measured on: cores, threads, load, versions."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    versions = {name: importlib.metadata.version(name)
                for name in ("torch", "torch_geometric", "flwr", "numpy")}
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
    """One round of Algorithm 1 with every user sampled: clients + aggregation, then server."""
    config = replace(config, fraction=1.0)
    start = time.perf_counter()
    federation = InProcessFederation(data, config)
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    aggregated = federation.train_round(1)
    clients_s = time.perf_counter() - start
    start = time.perf_counter()
    federation.server.finish_round(aggregated, 1)
    server_s = time.perf_counter() - start
    return {"variant": config.variant, "users_trained": federation.last_round["num-users"],
            "shared_edges": len(federation.server.shared), "server_steps": config.server_steps,
            "setup_seconds": setup_s, "clients_and_aggregation_seconds": clients_s,
            "server_refinement_seconds": server_s, "round_seconds": clients_s + server_s}


def _print_section(title: str, figures: dict[str, Any]) -> None:
    print(f"\n== {title}", flush=True)
    for key, value in figures.items():
        text = f"{value:,.3f}" if isinstance(value, float) else str(value)
        print(f"  {key:32s} {text}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", help="ML-1M folder or ratings.dat (else the cache, else "
                                       "synthetic data)")
    parser.add_argument("--quick", action="store_true", help="a small synthetic dataset")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--dim", type=int, default=FederatedConfig().dim)
    parser.add_argument("--per-user-sample", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=10, help="timed propagation calls")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["clients", "propagation", "round"])
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
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
        "propagation": ("propagation", lambda: propagation(
            data, args.dim, config.num_layers, args.repeats, args.seed)),
        "round": ("learning_round", lambda: learning_round(data, config)),
    }
    for key, (title, run) in parts.items():
        if key in args.skip:
            continue
        start = time.perf_counter()
        figures[title] = run()
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
