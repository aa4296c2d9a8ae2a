"""``fedshare cau-table``: every sequence-unlearning method over backbones and seeds (issue 17).

For each backbone and seed: the sessions of the dataset split with that seed, the Original
(federated training on every session), the requests (10% of training sessions, one position
each), then every method of :mod:`fedshare.sequences.unlearning_methods` on the same Original.
Writes, in one folder: ``cau_table.csv`` (one row per backbone, seed and method),
``cau_table.md`` (means and standard deviations over seeds), ``summary.json`` (settings, means,
the issue's targets checked) and ``cau_plane.png`` (Recall@10 against Hit_u@1 per method).

Resumable: each finished cell (backbone, seed, method) is kept in ``cells/`` and each Original
in ``models/``; ``--resume FOLDER`` recomputes nothing finished, and refuses a folder made with
other settings. Ctrl-C leaves such a folder; ``--resume FOLDER --report-only`` writes the outputs
from the cells it has (each row says over how many seeds it averages).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import torch

from fedshare.atomic import write_atomically, write_json
from fedshare.errors import FedShareError
from fedshare.run_lease import RunLease
from fedshare.sequences.config import SequenceConfig
from fedshare.sequences.data import SequenceData, prepare_sequences
from fedshare.sequences.federated import FederatedResult, make_backbone
from fedshare.sequences.requests import sequence_requests
from fedshare.sequences.unlearning_methods import (
    ABLATIONS,
    CAU_VARIANTS,
    LEARNING,
    METHODS,
    CAUSettings,
    UnlearningCase,
    original_model,
    run_case,
)
from simulations.experiment import new_folder

COLUMNS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20", "hit_u@1", "hit_u@5",
           "hit_u_full@1", "hit_u_full@5", "u_score", "seconds", "client_messages",
           "bytes_down", "bytes_up", "devices_online")
BACKBONES = ("sasrec", "gru4rec")


@dataclasses.dataclass(frozen=True)
class TableSettings:
    """Everything a cell depends on (a resumed folder must have the same)."""

    dataset: str = "ml-100k"
    data_path: str | None = None
    max_len: int = 50
    request_fraction: float = 0.1
    fed: SequenceConfig = LEARNING
    cau: CAUSettings = dataclasses.field(default_factory=CAUSettings)

    def record(self) -> dict:
        return dataclasses.asdict(self)


def check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise FedShareError(f"unknown method(s) {', '.join(unknown)}; choose from "
                            f"{', '.join(METHODS)}")
    return tuple(methods)


def check_backbones(backbones: Sequence[str]) -> tuple[str, ...]:
    unknown = [b for b in backbones if b not in BACKBONES]
    if unknown:
        raise FedShareError(f"unknown backbone(s) {', '.join(unknown)}; sasrec or gru4rec")
    return tuple(backbones)


def open_folder(out: str | Path, resume: str | Path | None, settings: TableSettings) -> Path:
    """A new ``cau-table`` folder, or the resumed one if it was made with ``settings``."""
    if resume is None:
        folder = new_folder(out, "cau-table")
        write_json(folder / "settings.json", settings.record())
        return folder
    folder = Path(resume)
    recorded = folder / "settings.json"
    if not recorded.is_file():
        raise FedShareError(f"{folder} is not a cau-table folder (no settings.json)")
    if json.loads(recorded.read_text()) != json.loads(json.dumps(settings.record())):
        raise FedShareError(f"{folder} was made with other settings; resume it with the same "
                            "options or start a new folder")
    return folder


def original(folder: Path, data: SequenceData, fed: SequenceConfig, seed: int,
             progress: Callable[[str], None]) -> FederatedResult:
    """The Original of (backbone, seed), trained once and kept in ``models/``."""
    path = folder / "models" / f"{fed.backbone}-s{seed}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=False)
        model = make_backbone(fed.backbone, data.num_items, data.max_len, fed.dim)
        model.load_state_dict(saved["state"])
        return FederatedResult(model, pd.DataFrame(), best_round=saved["best_round"],
                               test=saved["test"])
    progress(f"{fed.backbone} seed {seed}: training the Original ({fed.rounds} rounds)")
    result = original_model(data, fed, seed)
    path.parent.mkdir(exist_ok=True)
    write_atomically(path, lambda fh: torch.save(
        {"state": result.model.state_dict(), "best_round": result.best_round,
         "test": result.test}, fh))
    return result


def cau_table(backbones: Sequence[str] = BACKBONES, seeds: Sequence[int] = (0, 1, 2),
              settings: TableSettings | None = None, methods: Sequence[str] = METHODS,
              out: str | Path = "runs", resume: str | Path | None = None,
              progress: Callable[[str], None] = print, report_only: bool = False
              ) -> tuple[Path, pd.DataFrame, dict]:
    """Run (or finish) every cell; write the table, summary and plot (module docstring).
    ``report_only`` (with ``resume``): compute nothing, report the cells the folder has."""
    if report_only and resume is None:
        raise FedShareError("--report-only reports a folder: give it with --resume")
    settings = settings or TableSettings()
    backbones, methods = check_backbones(backbones), check_methods(methods)
    datas = {seed: prepare_sequences(settings.dataset, settings.data_path,
                                     max_len=settings.max_len, split_seed=seed)
             for seed in seeds}  # bad data fail before a folder is made
    folder = open_folder(out, resume, settings)
    with RunLease(folder):  # the folder's only writer while this command runs
        return fill(folder, backbones, seeds, settings, methods, datas, progress, report_only)


def fill(folder: Path, backbones: tuple[str, ...], seeds: Sequence[int],
         settings: TableSettings, methods: tuple[str, ...], datas: dict[int, SequenceData],
         progress: Callable[[str], None], report_only: bool = False
         ) -> tuple[Path, pd.DataFrame, dict]:
    """The cells not yet in ``folder`` (none with ``report_only``), then the outputs from the
    cells there are; a row says over how many seeds it is averaged."""
    (folder / "cells").mkdir(exist_ok=True)
    total, done, started = len(backbones) * len(seeds) * len(methods), 0, time.perf_counter()
    rows: list[dict] = []
    for backbone in backbones:
        fed = dataclasses.replace(settings.fed, backbone=backbone)
        for seed in seeds:
            cells = {m: folder / "cells" / f"{backbone}-s{seed}-{m}.json" for m in methods}
            kept = {m: json.loads(p.read_text()) for m, p in cells.items() if p.is_file()}
            todo = () if report_only else tuple(m for m in methods if m not in kept)
            if todo:
                data = datas[seed]
                case = UnlearningCase(
                    data, sequence_requests(data, settings.request_fraction, seed),
                    original(folder, data, fed, seed, progress), fed, settings.cau, seed)

                def save(method: str, row: dict, backbone=backbone, seed=seed, cells=cells,
                         kept=kept) -> None:
                    nonlocal done
                    row = {"backbone": backbone, "seed": seed, **row}
                    write_json(cells[method], row)
                    kept[method] = row
                    done += 1
                    progress(progress_line(row, done, total, time.perf_counter() - started))

                run_case(case, todo, save)
            done += len(methods) - len(todo)
            rows += [kept[m] for m in methods if m in kept]
    if not rows:
        raise FedShareError(f"{folder} has no finished cell of these backbones, seeds and "
                            "methods")
    frame = pd.DataFrame(rows)
    stats = summarise(frame)
    frame.to_csv(folder / "cau_table.csv", index=False)
    (folder / "cau_table.md").write_text(to_markdown(stats, settings))
    summary = {"settings": settings.record(), "seeds": list(seeds),
               "backbones": list(backbones), "means": means_record(stats),
               "targets": targets(stats)}
    write_json(folder / "summary.json", summary)
    plot(stats, folder / "cau_plane.png")
    return folder, stats, summary


def progress_line(row: dict, done: int, total: int, elapsed: float) -> str:
    left = elapsed / max(done, 1) * (total - done)
    return (f"[{done}/{total} cells, {elapsed / 60:.1f} min, ~{left / 60:.0f} min left] "
            f"{row['backbone']} seed {row['seed']} {row['method']:>18}: R@10 "
            f"{row['recall@10']:.4f} Hit_u@1 {row['hit_u@1']:.3f} U {row['u_score']:.4f} "
            f"({row['seconds']:.1f} s)")


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds per (backbone, method), methods in the table's order (std is
    NaN for one seed, and then left out of the markdown)."""
    numeric = [c for c in COLUMNS if c in frame.columns]
    groups = frame.groupby(["backbone", "method"], sort=False)
    stats = groups[numeric].agg(["mean", "std"])
    stats[("seeds", "mean")] = groups["seed"].nunique()
    stats[("seeds", "std")] = float("nan")
    return stats


def means_record(stats: pd.DataFrame) -> dict:
    means = stats.xs("mean", axis=1, level=1)
    return {b: {m: {k: float(v) for k, v in means.loc[(b, m)].items()}
                for m in means.loc[b].index} for b in means.index.get_level_values(0).unique()}


def targets(stats: pd.DataFrame) -> dict:
    """The issue's targets, per backbone, on the means over seeds (absent methods skipped)."""
    means = stats.xs("mean", axis=1, level=1)
    out: dict = {}
    for backbone in means.index.get_level_values(0).unique():
        m = means.loc[backbone]
        have = set(m.index)
        checks: dict = {}
        if {"original", "retrain"} <= have:
            r0, ret = m.loc["original", "recall@10"], m.loc["retrain"]
            ablations = [a for a in ABLATIONS if a in have]
            for variant in [v for v in CAU_VARIANTS if v in have]:
                row = m.loc[variant]
                checks[variant] = {
                    "recall_kept": float(row["recall@10"] / r0) if r0 else math.nan,
                    "recall_at_least_95pct": bool(row["recall@10"] >= 0.95 * r0),
                    "hit_u1_at_most_retrain": bool(row["hit_u@1"] <= ret["hit_u@1"]),
                    "u_above_retrain": bool(row["u_score"] > ret["u_score"]),
                    "u_above_every_ablation": bool(all(row["u_score"] > m.loc[a, "u_score"]
                                                       for a in ablations)),
                    "time_over_retrain": float(row["seconds"] / ret["seconds"])
                    if ret["seconds"] else math.nan,
                }
            if "ga" in have:
                checks["ga_collapses"] = bool(m.loc["ga", "recall@10"] < 0.5 * r0)
        out[backbone] = checks
    return out


def to_markdown(stats: pd.DataFrame, settings: TableSettings) -> str:
    """Means ± std over seeds; traffic in messages and MB."""
    lines = [f"Dataset {settings.dataset}; unlearning batch {settings.cau.batch_size}; "
             f"requests {settings.request_fraction:.0%} of training sessions. Recall/NDCG over "
             "every prediction point of the test devices; Hit_u over the forget samples "
             "(lower is better; sampled = among 500 negatives, full = all items); U-score "
             "beta 3 from Recall@10 and sampled Hit_u@1; seconds = the unlearning's compute.",
             "",
             "| backbone | method | seeds | R@10 | N@10 | R@20 | N@20 | Hit_u@1 | Hit_u@5 | "
             "full Hit_u@1 | U | seconds | messages | MB down | MB up | devices |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(b: str, m: str, name: str, digits: int = 4) -> str:
        mean, std = stats.loc[(b, m), (name, "mean")], stats.loc[(b, m), (name, "std")]
        return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")

    for b, m in stats.index:
        mb = {k: stats.loc[(b, m), (k, "mean")] / 1e6 for k in ("bytes_down", "bytes_up")}
        lines.append(
            f"| {b} | {m} | {stats.loc[(b, m), ('seeds', 'mean')]:.0f} | "
            + " | ".join(cell(b, m, n) for n in (
                "recall@10", "ndcg@10", "recall@20", "ndcg@20", "hit_u@1", "hit_u@5",
                "hit_u_full@1", "u_score"))
            + f" | {cell(b, m, 'seconds', 1)} | "
            f"{stats.loc[(b, m), ('client_messages', 'mean')]:,.0f} | {mb['bytes_down']:,.0f} "
            f"| {mb['bytes_up']:,.0f} | {stats.loc[(b, m), ('devices_online', 'mean')]:.0f} |")
    return "\n".join(lines) + "\n"


MARKERS = {"original": ("o", "black"), "retrain": ("s", "tab:green"),
           "fedavg-remaining": ("D", "tab:olive"), "ga": ("x", "tab:red"),
           "wo-ps": ("v", "tab:pink"), "wo-cu": ("^", "tab:brown"),
           "cau-gradient-hard": ("P", "tab:blue"), "cau-gradient-soft": ("p", "tab:cyan"),
           "cau-embedding-hard": ("*", "tab:purple"), "cau-embedding-soft": ("h", "tab:orange"),
           "cau-local": ("X", "tab:gray")}


def plot(stats: pd.DataFrame, path: Path) -> Path:
    """Recall@10 (higher is better) against Hit_u@1 (lower is better), one panel per
    backbone, one marker and colour per method, with a legend naming them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backbones = list(stats.index.get_level_values(0).unique())
    fig, axes = plt.subplots(1, len(backbones), figsize=(6 * len(backbones), 4.5),
                             squeeze=False)
    for ax, backbone in zip(axes[0], backbones, strict=True):
        part = stats.loc[backbone]
        for method in part.index:
            marker, colour = MARKERS.get(method, ("o", None))
            ax.scatter(part.loc[method, ("hit_u@1", "mean")],
                       part.loc[method, ("recall@10", "mean")], marker=marker, color=colour,
                       s=70, alpha=0.85, label=method)
        ax.set_title(f"{backbone}: utility against memory of the forgotten items")
        ax.set_xlabel("Hit_u@1 of forgotten items (lower = more forgotten)")
        ax.set_ylabel("test Recall@10")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    write_atomically(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)
    return path


def main() -> None:  # python -m simulations.cau_table
    folder, _, summary = cau_table()
    print(json.dumps(summary["targets"], indent=2))
    print(f"saved in {folder}")


if __name__ == "__main__":
    main()
