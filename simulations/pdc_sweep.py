"""``fedshare pdc-sweep``: PDC-FRS's utility against its privacy budget (issue 18).

For every epsilon and seed, one in-process run of variant ``pdc-frs``
(``simulations/configs/pdc-frs.toml``, ``--set`` overrides on top) with ``pdc-epsilon`` = epsilon
and the model seed = seed (the split and sharing plan stay those of the data settings, as in the
learning table). Writes, in one folder:

- ``pdc_sweep.csv``: one row per (epsilon, seed): test and validation HR@20 / NDCG@20, and what
  the mechanism let through of the shared items (:func:`leakage`): ``neighbour_rate``, the
  fraction of shared items whose report lies within :data:`NEIGHBOURS` catalogue positions of
  the real item (an attacker guessing the 2 x NEIGHBOURS ids around each report is right that
  often; ``uniform_rate`` is what a report drawn uniformly would give), ``mean_similarity`` of
  report and real item, and ``user_epsilon_median``, the median sharing user's total budget
  (epsilon times its shared items, basic composition);
- ``pdc_sweep_summary.csv``: mean and std per epsilon;
- ``references.csv``: the same seeds and settings with each reference variant (by default
  ``no-sharing``, nothing shared, and ``wo-cl``, the same server training on the unperturbed
  shared data), so the curve can be read against both ends;
- ``pdc_sweep.md``: the summary table, references below it;
- ``pdc_sweep.png``: HR@20 and NDCG@20 against epsilon (log scale), mean ± std over seeds, the
  references as horizontal bands (mean ± std).

The in-process engine runs the Flower app's client, aggregation and server code (a test checks
the two engines give the same PDC-FRS model), and draws the same perturbations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedshare.data.prepared import PreparedData
from fedshare.errors import FedShareError
from fedshare.federated.config import VARIANTS
from fedshare.federated.pdc import PdcSettings, perturb_shared, similarity
from fedshare.runconfig import data_key, load_data
from simulations.experiment import leased_folder, resolve, run_experiment
from simulations.processes import worker_pool

CONFIG = Path(__file__).parent / "configs" / "pdc-frs.toml"
EPSILONS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0)
REFERENCES = ("no-sharing", "wo-cl")
LABELS = {"no-sharing": "no-sharing: nothing shared",
          "wo-cl": "wo-cl: the same server training on the real shared items"}
"""How the plot names a reference variant (others by their name)."""
NEIGHBOURS = 10
"""Half-width of the catalogue window of :func:`leakage`'s ``neighbour_rate``."""


def leakage(data: PreparedData, epsilon: float, seed: int) -> dict[str, float]:
    """What the reports of a run with ``epsilon`` and ``seed`` reveal of the shared items: the
    same draws the devices make (:func:`fedshare.federated.pdc.perturb_shared`), compared with
    the real items (see the module docstring)."""
    train = data.split.train
    shared = data.plan.shared_data(train)
    ptr, held = train.items_by_user()
    reported = perturb_shared(shared.users, shared.items, ptr, held, data.num_items, epsilon,
                              seed)
    n = data.num_items
    distance = np.abs(reported - shared.items)
    sims = similarity(shared.items, reported, n)
    counts = np.bincount(shared.users, minlength=data.num_users)
    counts = counts[counts > 0]
    return {"neighbour_rate": float((distance <= NEIGHBOURS).mean()) if len(distance) else 0.0,
            "uniform_rate": min(1.0, 2 * NEIGHBOURS / max(n - 1, 1)),
            "mean_similarity": float(sims.mean()) if len(sims) else 0.0,
            "user_epsilon_median": float(np.median(counts) * epsilon) if len(counts) else 0.0}


def _cell(args: tuple) -> dict:
    epsilon, seed, sets, out = args
    torch.set_num_threads(1)
    experiment = resolve(CONFIG, [*sets, f"seed={seed}", f"pdc-epsilon={epsilon!r}"],
                         name=f"pdc-frs-eps{epsilon:g}-seed{seed}")
    folder, summary = run_experiment(experiment, out, "inprocess")
    data = load_data(data_key(experiment.run, {}))
    return {"eps": epsilon, "seed": seed, "test_hr@20": summary["test"]["hr@20"],
            "test_ndcg@20": summary["test"]["ndcg@20"], "valid_hr@20": summary["valid"]["hr@20"],
            "valid_ndcg@20": summary["valid"]["ndcg@20"],
            **leakage(data, epsilon, seed), "seconds": summary["seconds"], "run": str(folder)}


def _reference_cell(args: tuple) -> dict:
    variant, seed, sets, out = args
    torch.set_num_threads(1)
    experiment = resolve(None, [*sets, f"variant={variant}", f"seed={seed}"],
                         name=f"{variant}-seed{seed}")
    folder, summary = run_experiment(experiment, out, "inprocess")
    return {"variant": variant, "seed": seed, "test_hr@20": summary["test"]["hr@20"],
            "test_ndcg@20": summary["test"]["ndcg@20"], "seconds": summary["seconds"],
            "run": str(folder)}


def check_sweep(eps_values: Sequence[float], seeds: Sequence[int], sets: Sequence[str],
                references: Sequence[str] = ()) -> None:
    """Refuse bad input before any run, each with a one-line error."""
    if not eps_values:
        raise FedShareError("--eps needs at least one epsilon")
    if not seeds:
        raise FedShareError("--seeds needs at least one seed")
    for epsilon in eps_values:
        PdcSettings(epsilon=epsilon)  # positive and finite
    if len(set(eps_values)) != len(eps_values) or len(set(seeds)) != len(seeds):
        raise FedShareError("--eps and --seeds must not repeat a value")
    for item in sets:
        key = item.partition("=")[0].strip()
        if key in ("pdc-epsilon", "seed", "variant"):
            raise FedShareError(f"--set {key} is the sweep's own: use --eps and --seeds")
    for name in references:
        if name not in VARIANTS or name == "pdc-frs":
            others = ", ".join(v for v in VARIANTS if v != "pdc-frs")
            raise FedShareError(f"unknown reference {name!r}; choose among {others}")


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds per epsilon, ascending."""
    columns = ("test_hr@20", "test_ndcg@20", "valid_hr@20", "valid_ndcg@20", "neighbour_rate",
               "mean_similarity", "user_epsilon_median")
    stats = rows.groupby("eps").agg(**{f"{c}_{f}": (c, f) for c in columns
                                       for f in ("mean", "std")}, seeds=("seed", "nunique"))
    return stats.fillna(0.0).sort_index()


def summarise_references(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds per reference variant, in the order given."""
    if rows.empty:
        return pd.DataFrame()
    order = {name: k for k, name in enumerate(rows["variant"].drop_duplicates())}
    stats = rows.groupby("variant", sort=False).agg(
        **{f"{c}_{f}": (c, f) for c in ("test_hr@20", "test_ndcg@20") for f in ("mean", "std")},
        seeds=("seed", "nunique"))
    return stats.fillna(0.0).sort_index(key=lambda idx: idx.map(order))


def to_markdown(stats: pd.DataFrame, uniform_rate: float,
                references: pd.DataFrame | None = None) -> str:
    lines = ["| epsilon | test HR@20 | test NDCG@20 | reports within "
             f"±{NEIGHBOURS} ids (uniform {uniform_rate:.3f}) | median user epsilon | seeds |",
             "|---|---|---|---|---|---|"]
    for eps, row in stats.iterrows():
        lines.append(f"| {eps:g} | {row['test_hr@20_mean']:.4f} ± {row['test_hr@20_std']:.4f} "
                     f"| {row['test_ndcg@20_mean']:.4f} ± {row['test_ndcg@20_std']:.4f} "
                     f"| {row['neighbour_rate_mean']:.3f} "
                     f"| {row['user_epsilon_median_mean']:g} | {int(row['seeds'])} |")
    for name, row in (references if references is not None else pd.DataFrame()).iterrows():
        lines.append(f"| reference: {name} | {row['test_hr@20_mean']:.4f} ± "
                     f"{row['test_hr@20_std']:.4f} | {row['test_ndcg@20_mean']:.4f} ± "
                     f"{row['test_ndcg@20_std']:.4f} | | | {int(row['seeds'])} |")
    return "\n".join(lines) + "\n"


def plot(stats: pd.DataFrame, path: Path, references: pd.DataFrame | None = None) -> Path:
    """HR@20 and NDCG@20 (test) against epsilon, log x axis, mean ± std over seeds; each
    reference variant a horizontal band (mean ± std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    eps = stats.index.to_numpy(dtype=float)
    for ax, metric, label in zip(axes, ("test_hr@20", "test_ndcg@20"),
                                 ("test HR@20", "test NDCG@20"), strict=True):
        ax.errorbar(eps, stats[f"{metric}_mean"], yerr=stats[f"{metric}_std"], marker="o",
                    capsize=4, label="PDC-FRS")
        refs = references if references is not None else pd.DataFrame()
        for k, (name, row) in enumerate(refs.iterrows(), 1):
            mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
            ax.axhline(mean, color=f"C{k}", linestyle="--", linewidth=1,
                       label=LABELS.get(str(name), str(name)))
            ax.axhspan(mean - std, mean + std, color=f"C{k}", alpha=0.12)
        ax.legend(fontsize=8, loc="best")
        ax.set_xscale("log")
        ax.set_xlabel("epsilon per shared item (exponential mechanism)")
        ax.set_ylabel(label)
        ax.set_title(f"PDC-FRS: {label} against epsilon (mean ± std, "
                     f"{int(stats['seeds'].min())} seeds)", fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def eps_sweep(eps_values: Sequence[float] = EPSILONS, seeds: Sequence[int] = (0, 1, 2),
              sets: Sequence[str] = (), out: str | Path = "runs", workers: int = 2,
              progress: Callable[[str], None] = print,
              references: Sequence[str] = REFERENCES) -> tuple[Path, pd.DataFrame]:
    """Run every (epsilon, seed) cell and every reference, and write the outputs (module
    docstring); returns the folder and the per-epsilon summary."""
    eps_values, seeds = [float(e) for e in eps_values], [int(s) for s in seeds]
    check_sweep(eps_values, seeds, sets, references)
    experiment = resolve(CONFIG, list(sets))  # validates --set early
    load_data(data_key(experiment.run, {}))  # and the data, before any folder is made
    if workers < 1:
        raise FedShareError(f"--workers must be >= 1, got {workers}")
    with leased_folder(out, "pdc-sweep") as folder:
        cells = [(e, s, list(sets), folder / "runs") for e in eps_values for s in seeds]
        others = [(v, s, list(sets), folder / "runs") for v in references for s in seeds]
        rows: list[dict] = []
        reference_rows: list[dict] = []
        with worker_pool(workers) as pool:
            jobs = [pool.submit(_cell, cell) for cell in cells]
            jobs += [pool.submit(_reference_cell, cell) for cell in others]
            for done, job in enumerate(jobs, 1):
                row = job.result()
                name = f"eps {row['eps']:g}" if "eps" in row else row["variant"]
                (rows if "eps" in row else reference_rows).append(row)
                progress(f"[{done}/{len(jobs)}] {name} seed {row['seed']}: test HR@20 "
                         f"{row['test_hr@20']:.4f} NDCG@20 {row['test_ndcg@20']:.4f} "
                         f"({row['seconds']:.0f} s)")
        frame = pd.DataFrame(rows)
        refs = summarise_references(pd.DataFrame(reference_rows))
        if reference_rows:
            pd.DataFrame(reference_rows).to_csv(folder / "references.csv", index=False)
        frame.to_csv(folder / "pdc_sweep.csv", index=False)
        stats = summarise(frame)
        stats.to_csv(folder / "pdc_sweep_summary.csv")
        uniform = float(frame["uniform_rate"].iloc[0]) if len(frame) else math.nan
        (folder / "pdc_sweep.md").write_text(to_markdown(stats, uniform, refs))
        plot(stats, folder / "pdc_sweep.png", refs)
        return folder, stats
