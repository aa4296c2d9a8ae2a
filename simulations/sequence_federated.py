"""Federated (in-process FedAvg) sequence training on a real dataset (issue 17): a measurement.

    python -m simulations.sequence_federated --backbone sasrec --rounds 100 --fraction 0.1

Prints validation Recall@10 every ``--eval-every`` rounds, then test Recall/NDCG@10/20 of the
best-validation global model, the median time per round and the devices trained per second
(compare with ``python -m simulations.sequence_central``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fedshare.sequences.data import prepare_sequences
from fedshare.sequences.federated import run_federated


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="sasrec")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data-path", default=None)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--server-optimizer", default="fedavg", help="fedavg or adam (FedAdam)")
    parser.add_argument("--server-lr", type=float, default=1e-2)
    parser.add_argument("--server-betas", type=float, nargs=2, default=(0.9, 0.99),
                        metavar=("BETA1", "BETA2"), help="FedAdam's betas")
    parser.add_argument("--server-eps", type=float, default=1e-3, help="FedAdam's eps")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = prepare_sequences(args.dataset, args.data_path, max_len=args.max_len,
                             split_seed=args.seed)
    print(f"{args.dataset}: {data.num_sessions} sessions, {data.num_items} items, "
          f"fingerprint {data.fingerprint()}", flush=True)
    started = time.perf_counter()

    def progress(row: dict) -> None:
        print(f"  round {row['round']:4d}  {time.perf_counter() - started:7.1f} s  "
              f"valid R@10 {row['recall@10']:.4f}", flush=True)

    result = run_federated(data, args.backbone, args.rounds, args.fraction, args.local_epochs,
                           args.lr, args.seed, args.eval_every, dim=args.dim, nodes=args.nodes,
                           optimizer=args.optimizer, progress=progress,
                           server_optimizer=args.server_optimizer, server_lr=args.server_lr,
                           server_betas=tuple(args.server_betas), server_eps=args.server_eps)
    per_round = statistics.median(result.round_seconds)
    devices = float(result.log["num-users"].median())
    row = {"backbone": args.backbone, "rounds": args.rounds, "fraction": args.fraction,
           "local_epochs": args.local_epochs, "lr": args.lr, "optimizer": args.optimizer,
           "server_optimizer": args.server_optimizer, "server_lr": args.server_lr,
           "server_betas": list(args.server_betas), "server_eps": args.server_eps,
           "best_round": result.best_round, "valid": result.best_valid, "test": result.test,
           "seconds_per_round": per_round, "devices_per_round": devices,
           "devices_per_second": devices / per_round,
           "wall_seconds": time.perf_counter() - started}
    test = result.test
    print(f"{args.backbone}: test R@10 {test['recall@10']:.4f} N@10 {test['ndcg@10']:.4f} "
          f"R@20 {test['recall@20']:.4f} N@20 {test['ndcg@20']:.4f}; best round "
          f"{result.best_round}; {per_round:.2f} s/round, {devices / per_round:.0f} devices/s",
          flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
