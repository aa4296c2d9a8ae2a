"""The learning table (paper Table III, ML-100K): every learning-phase method over 3 seeds.

Rows: FedShare with the settings chosen on validation, FedShare as the paper writes it
(faithful: Eq. 16 over full tables, one local epoch), its ablations w/o CL and w/o BPR,
FedShare-FedAvg, no-sharing FedAvg (tuned and faithful), the learning baselines PDC-FRS and
CDCGNNFed (issue 18), and beside them the centralised LightGCN and popularity. The tuned methods
run at the settings ``fedshare tune-learning`` chose on other plans
(:data:`simulations.tune_learning.CHOSEN` by default). Cells are mean ± std of test HR@20 /
NDCG@20 over the seeds (the model seed; the split and sharing plan stay those of seed 0, as in
the paper's setting). Saved as
``learning_table.csv`` (one row per method and seed), ``learning_table.md`` and
``learning_table_summary.csv`` in the output folder.

The in-process engine runs exactly the Flower app's client, aggregation and server code (a test
checks the two engines give the same model); ``--engine flower`` runs every cell through Flower.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch

from fedshare.central import CentralConfig, run_central
from fedshare.runconfig import data_key, load_data
from simulations.experiment import leased_folder, resolve, run_experiment
from simulations.processes import worker_pool

CONFIGS = Path(__file__).parent / "configs"
METHODS = (
    ("FedShare", "fedshare"),
    ("FedShare (faithful Eq. 16)", "fedshare-faithful"),
    ("FedShare w/o CL", "wo-cl"),
    ("FedShare w/o BPR", "wo-bpr"),
    ("FedShare-FedAvg", "fedshare-fedavg"),
    ("No-sharing FedAvg", "no-sharing"),
    ("No-sharing FedAvg (faithful Eq. 16)", "no-sharing-faithful"),
    ("PDC-FRS", "pdc-frs"),
    ("CDCGNNFed", "cdcgnnfed"),
)


def _federated_cell(args: tuple) -> dict:
    label, name, seed, sets, engine, out = args
    torch.set_num_threads(1)
    experiment = resolve(CONFIGS / f"{name}.toml", [f"seed={seed}", *sets],
                         name=f"{name}-seed{seed}")
    folder, summary = run_experiment(experiment, out, engine)
    return {"method": label, "seed": seed, "test_hr@20": summary["test"]["hr@20"],
            "test_ndcg@20": summary["test"]["ndcg@20"], "valid_hr@20": summary["valid"]["hr@20"],
            "valid_ndcg@20": summary["valid"]["ndcg@20"], "seconds": summary["seconds"],
            "run": str(folder)}


def _central_cell(args: tuple) -> dict:
    model, seed, key = args
    torch.set_num_threads(1)
    result = run_central(load_data(key).split, model, CentralConfig(seed=seed))
    label = {"lightgcn": "Centralised LightGCN", "popularity": "Popularity"}[model]
    return {"method": label, "seed": seed, "test_hr@20": result.test["hr@20"],
            "test_ndcg@20": result.test["ndcg@20"], "valid_hr@20": result.valid["hr@20"],
            "valid_ndcg@20": result.valid["ndcg@20"], "seconds": result.seconds, "run": ""}


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean and std per method, in table order."""
    order = {label: k for k, label in enumerate(rows["method"].drop_duplicates())}
    stats = rows.groupby("method", sort=False).agg(
        **{f"{m}_{f}": (m, f) for m in ("test_hr@20", "test_ndcg@20") for f in ("mean", "std")},
        seeds=("seed", "nunique"), seconds=("seconds", "mean"))
    return stats.fillna(0.0).sort_index(key=lambda idx: idx.map(order))


def to_markdown(stats: pd.DataFrame) -> str:
    lines = ["| method | test HR@20 | test NDCG@20 | seeds | seconds/run |",
             "|---|---|---|---|---|"]
    for method, row in stats.iterrows():
        lines.append(f"| {method} | {row['test_hr@20_mean']:.4f} ± {row['test_hr@20_std']:.4f} "
                     f"| {row['test_ndcg@20_mean']:.4f} ± {row['test_ndcg@20_std']:.4f} "
                     f"| {int(row['seeds'])} | {row['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def learning_table(seeds: Sequence[int] = (0, 1, 2), sets: Sequence[str] = (),
                   engine: str = "inprocess", out: str | Path = "runs", workers: int = 2,
                   progress: Callable[[str], None] = print,
                   chosen: Mapping[str, Sequence[str]] | None = None
                   ) -> tuple[Path, pd.DataFrame]:
    """Run every cell, write the table files, return the folder and the summary frame.

    ``chosen``: per config name, the ``--set`` list of its settings chosen by
    ``fedshare tune-learning`` (on plans this table does not report), applied after ``sets``.
    """
    chosen = chosen or {}
    experiment = resolve(CONFIGS / "fedshare.toml", list(sets))  # validates --set early
    key = data_key(experiment.run, {})
    load_data(key)  # and the data, before any folder is made
    with leased_folder(out, "learning-table") as folder:
        federated = [(label, name, s, [*sets, *chosen.get(name, ())], engine, folder / "runs")
                     for label, name in METHODS for s in seeds]
        central = [(model, s, key) for model in ("lightgcn", "popularity") for s in seeds]
        rows: list[dict] = []
        # Flower runs manage their own processes (Ray): run them one at a time.
        pool_size = 1 if engine == "flower" else max(1, workers)
        with worker_pool(pool_size) as pool:
            jobs = [pool.submit(_federated_cell, job) for job in federated]
            jobs += [pool.submit(_central_cell, job) for job in central]
            for done, job in enumerate(jobs, 1):
                row = job.result()
                rows.append(row)
                progress(f"[{done}/{len(jobs)}] {row['method']} seed {row['seed']}: test HR@20 "
                         f"{row['test_hr@20']:.4f} NDCG@20 {row['test_ndcg@20']:.4f} "
                         f"({row['seconds']:.0f} s)")
        frame = pd.DataFrame(rows)
        frame.to_csv(folder / "learning_table.csv", index=False)
        stats = summarise(frame)
        stats.to_csv(folder / "learning_table_summary.csv")
        (folder / "learning_table.md").write_text(to_markdown(stats))
        return folder, stats


def main() -> None:  # python -m simulations.learning_table
    folder, stats = learning_table()
    print(to_markdown(stats))
    print(f"saved in {folder}")


if __name__ == "__main__":
    main()
