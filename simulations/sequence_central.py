"""Centralised reference run of the sequence backbones (issue 17): the row federated runs match.

    python -m simulations.sequence_central --backbone sasrec,gru4rec --dataset ml-100k

Trains each backbone on the training sessions with early stopping on validation Recall@10 and
prints (and optionally writes as JSON) test Recall/NDCG@10/20 and the time per epoch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fedshare.sequences.data import TEST, SequenceData, prepare_sequences
from fedshare.sequences.evaluate import evaluate
from fedshare.sequences.models import GRU4Rec, SASRec, SequenceModel
from fedshare.sequences.train import train_central


def make_model(backbone: str, data: SequenceData, dim: int) -> SequenceModel:
    if backbone == "sasrec":
        return SASRec(data.num_items, max_len=data.max_len, dim=dim)
    if backbone == "gru4rec":
        return GRU4Rec(data.num_items, dim=dim)
    raise SystemExit(f"unknown backbone {backbone!r} (sasrec, gru4rec)")


def run(backbone: str, data: SequenceData, args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    model = make_model(backbone, data, args.dim)
    started = time.perf_counter()

    def progress(epoch: int, loss: float, valid: dict[str, float]) -> None:
        if epoch % args.every == 0:
            print(f"  {backbone} epoch {epoch:3d} loss {loss:.4f} "
                  f"valid R@10 {valid['recall@10']:.4f}", flush=True)

    result = train_central(model, data, epochs=args.epochs, lr=args.lr,
                           batch_size=args.batch_size, patience=args.patience, seed=args.seed,
                           progress=progress)
    test = evaluate(model, torch.from_numpy(data.windows(TEST)))
    return {"backbone": backbone, "epochs_run": len(result.losses),
            "best_epoch": result.best_epoch, "valid": result.best_valid, "test": test,
            "seconds_per_epoch": statistics.median(result.epoch_seconds),
            "wall_seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="sasrec,gru4rec")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data-path", default=None)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--every", type=int, default=10, help="print every N epochs")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = prepare_sequences(args.dataset, args.data_path, max_len=args.max_len,
                             split_seed=args.seed)
    print(f"{args.dataset}: {data.num_sessions} sessions, {data.num_items} items, "
          f"{len(data.items)} interactions, fingerprint {data.fingerprint()}", flush=True)
    rows = []
    for backbone in args.backbone.split(","):
        row = run(backbone.strip(), data, args)
        rows.append(row)
        test = row["test"]
        print(f"{backbone}: test R@10 {test['recall@10']:.4f} N@10 {test['ndcg@10']:.4f} "
              f"R@20 {test['recall@20']:.4f} N@20 {test['ndcg@20']:.4f}; "
              f"{row['epochs_run']} epochs (best {row['best_epoch']}), "
              f"{row['seconds_per_epoch']:.2f} s/epoch", flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
