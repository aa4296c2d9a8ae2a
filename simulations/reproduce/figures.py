"""The reproduction's figures, drawn from a results folder's CSVs into ``folder/figures/``.

Each figure is drawn only when its CSV exists (a panel whose CSV is missing says "not run"),
written atomically (a crash leaves the old PNG or none) and closed. Every method keeps one
colour, marker, line style and hatch everywhere (:data:`readout.STYLES`), so a curve or bar
can be told apart in print and without the code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from fedshare.atomic import write_atomically
from simulations.reproduce.readout import (
    BACKBONE_LABELS,
    CAU_ABLATIONS,
    CAU_VARIANTS,
    LEARNING_ABLATIONS,
    LEARNING_TABLE3,
    MIB,
    UNLEARNING_FIG4,
    UNLEARNING_TABLE3,
    label,
    load_results,
    mean_std,
    ordered,
    style,
)

Results = dict[str, pd.DataFrame]


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display), imported only when drawing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    write_atomically(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    pyplot().close(fig)
    return path


def not_run(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"{what}: not run", ha="center", va="center", transform=ax.transAxes,
            fontsize=11, color="dimgray")
    ax.set_xticks([])
    ax.set_yticks([])


def seeds_note(frame: pd.DataFrame) -> str:
    n = frame["seed"].nunique() if "seed" in frame else 1
    return f"mean over {n} seed{'s' if n != 1 else ''}"


# ------------------------------------------------------------------------- learning curves


def learning_curves(results: Results, path: Path) -> Path:
    """Validation HR@20 and NDCG@20 against the round: mean line, min-max band over seeds."""
    plt = pyplot()
    data = results["curves"]
    order = (*LEARNING_TABLE3, *LEARNING_ABLATIONS[1:], "no-sharing")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, column, name in zip(axes, ("valid_hr@20", "valid_ndcg@20"), ("HR@20", "NDCG@20"),
                                strict=True):
        for method in ordered(data["method"].unique(), order):
            s = style(method)
            g = data[data["method"] == method].groupby("round")[column]
            mean, lo, hi = g.mean(), g.min(), g.max()
            ax.fill_between(mean.index, lo, hi, color=s.colour, alpha=0.15, linewidth=0)
            ax.plot(mean.index, mean.values, color=s.colour, marker=s.marker,
                    linestyle=s.line, markersize=5, linewidth=1.6, label=s.label)
        ax.set_xlabel("learning round")
        ax.set_ylabel(f"validation {name}")
        ax.set_title(f"Validation {name}")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"Learning curves ({seeds_note(data)}; shaded band: min-max over seeds)")
    return save(fig, path)


# -------------------------------------------------------------------------------- Fig. 4


def bar_labels(ax, xs: Sequence[float], tops: Sequence[float], texts: Sequence[str]) -> None:
    for x, top, text in zip(xs, tops, texts, strict=True):
        ax.annotate(text, (x, top), xytext=(0, 3), textcoords="offset points", ha="center",
                    va="bottom", fontsize=8)


def fig4(results: Results, path: Path) -> Path:
    """Unlearning time and bytes kept to unlearn per method (log scales), client vs server."""
    plt = pyplot()
    from matplotlib.patches import Patch

    data = results["unlearning"]
    methods = [m for m in ordered(data["method"].unique(), UNLEARNING_FIG4)
               if m != "no-unlearning"]
    stats = mean_std(data, "method", ["seconds", "kept_bytes", "client_bytes", "server_bytes"])
    stats = stats.loc[methods]
    xs = list(range(len(methods)))
    colours = [style(m).colour for m in methods]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))

    secs = stats["seconds"].clip(lower=1e-3)
    left.bar(xs, secs, yerr=stats["seconds_std"], color=colours, capsize=4,
             edgecolor="black", hatch=None)
    left.set_yscale("log")
    left.set_ylim(top=float((secs + stats["seconds_std"]).max()) * 3)
    bar_labels(left, xs, secs + stats["seconds_std"], [f"{v:.1f} s" for v in stats["seconds"]])
    left.set_ylabel("unlearning time (seconds, log scale)")
    left.set_title(f"(a) Unlearning time ({seeds_note(data)}; error bar: std)")

    server, client = stats["server_bytes"] / MIB, stats["client_bytes"] / MIB
    kept, kept_std = stats["kept_bytes"] / MIB, stats["kept_bytes_std"] / MIB
    right.bar(xs, server, color=colours, edgecolor="black")
    right.bar(xs, client, bottom=server, color=colours, edgecolor="black", hatch="///",
              alpha=0.6)
    positive = kept[kept > 0]
    floor = positive.min() / 5 if len(positive) else 1e-3
    right.set_yscale("log")
    right.errorbar(xs, kept.where(kept > 0), yerr=kept_std.where(kept > 0), fmt="none",
                   ecolor="black", capsize=4)
    for x, value, std in zip(xs, kept, kept_std, strict=True):
        if value > 0:
            bar_labels(right, [x], [value + std], [f"{value:.3f} MiB"])
        else:
            right.annotate("0 (keeps nothing)", (x, floor), xytext=(0, 4),
                           textcoords="offset points", ha="center", va="bottom", fontsize=8,
                           bbox={"boxstyle": "round", "facecolor": "white",
                                 "edgecolor": style(methods[x]).colour})
    right.set_ylim(floor, max((kept + kept_std).max(), floor) * 3)
    right.set_ylabel("bytes kept to unlearn (MiB, log scale)")
    right.set_title("(b) Storage kept to unlearn (error bar: std of the total)")
    right.legend(handles=[Patch(facecolor="lightgray", edgecolor="black", label="server"),
                          Patch(facecolor="lightgray", edgecolor="black", hatch="///",
                                label="clients (devices)")], fontsize=9, loc="upper left")
    for ax in (left, right):
        ax.set_xticks(xs, [label(m) for m in methods], rotation=20, ha="right")
        ax.grid(axis="y", alpha=0.3)
    return save(fig, path)


# -------------------------------------------------------------------------------- Fig. 5


def lines(ax, data: pd.DataFrame, x: str, column: str, methods: Sequence[str]) -> None:
    """One line per method: mean over seeds at each x, error bar = std."""
    for method in methods:
        part = data[data["method"] == method] if "method" in data else data
        stats = mean_std(part, x, [column]).sort_index()
        s = style(method)
        ax.errorbar(stats.index, stats[column], yerr=stats[f"{column}_std"], color=s.colour,
                    marker=s.marker, linestyle=s.line, capsize=3, label=s.label)


def sweep_users(ax, data: pd.DataFrame) -> None:
    order = data.groupby("groups")["shared_fraction"].mean().sort_values()
    where = {g: i for i, g in enumerate(order.index)}
    methods = ordered(data["method"].unique(), ("fedshare", "fedshare-fedavg", "cdcgnnfed",
                                                "pdc-frs"))
    for method in methods:
        s = style(method)
        stats = mean_std(data[data["method"] == method], "groups", ["test_hr@20"])
        stats = stats.loc[[g for g in order.index if g in stats.index]]
        ax.errorbar([where[g] for g in stats.index], stats["test_hr@20"],
                    yerr=stats["test_hr@20_std"], color=s.colour, marker=s.marker,
                    linestyle=s.line, capsize=3, label=s.label)
    ax.set_xticks(range(len(order)), [f"{g}\n({f:.0%} shared)" for g, f in order.items()],
                  fontsize=8)
    ax.set_xlabel("users full : partial : none (share of training interactions)")
    ax.set_title("(a) user-type ratio")
    ax.legend(fontsize=8)


def sweep_lambda(ax, data: pd.DataFrame) -> None:
    lines(ax, data, "lambda1", "test_hr@20", ["fedshare"])
    ax.set_xlabel("contrastive weight lambda1")
    ax.set_title("(b) contrastive weight lambda1")
    ax.legend(fontsize=8)


def sweep_snapshots(ax, data: pd.DataFrame) -> None:
    lines(ax, data, "snapshots", "test_hr@20", ["fedshare"])
    stats = mean_std(data, "snapshots", ["kept_bytes"]).sort_index()
    twin = ax.twinx()
    twin.errorbar(stats.index, stats["kept_bytes"] / MIB, yerr=stats["kept_bytes_std"] / MIB,
                  color="tab:gray", marker="s", linestyle="--", capsize=3,
                  label="bytes kept (MiB, right axis)")
    twin.set_ylabel("bytes kept to unlearn (MiB)", color="dimgray")
    ax.set_xticks(stats.index)
    ax.set_xlabel("historical snapshots M")
    ax.set_title("(c) number of snapshots M")
    handles = ax.get_legend_handles_labels()
    extra = twin.get_legend_handles_labels()
    ax.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=8, loc="lower right")


def sweep_gamma(ax, data: pd.DataFrame) -> None:
    methods = ordered(data["method"].unique(), ("fedshare", "fru", "cufru", "retrain"))
    lines(ax, data, "gamma", "test_hr@20", methods)
    ax.set_xlabel("unsharing ratio gamma (share of sharing users who unshare)")
    ax.set_title("(d) unlearning ratio gamma")
    ax.legend(fontsize=8)


def fig5(results: Results, path: Path) -> Path:
    """The four sensitivity sweeps of Fig. 5, test HR@20 (mean over seeds, std bars)."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    panels = (("sweep_users", sweep_users, "(a) user-type ratio"),
              ("sweep_lambda", sweep_lambda, "(b) contrastive weight lambda1"),
              ("sweep_snapshots", sweep_snapshots, "(c) number of snapshots M"),
              ("sweep_gamma", sweep_gamma, "(d) unlearning ratio gamma"))
    for ax, (name, draw, title) in zip(axes.flat, panels, strict=True):
        if name in results:
            draw(ax, results[name])
            ax.set_ylabel("test HR@20")
            ax.grid(alpha=0.3)
        else:
            not_run(ax, f"{name}.csv")
            ax.set_title(title)
    fig.suptitle("Fig. 5 sweeps: test HR@20, mean over seeds (error bar: std)")
    return save(fig, path)


# ---------------------------------------------------------------------------------- CAU


def cau_plane(results: Results, path: Path) -> Path:
    """Recall@10 (keep high) against Hit_u@1 of the forgotten items (push low), per backbone."""
    plt = pyplot()
    data = results["cau"]
    backbones = list(data["backbone"].unique())
    fig, axes = plt.subplots(1, len(backbones), figsize=(6.2 * len(backbones), 5.6),
                             squeeze=False)
    order = ("original", "retrain", *CAU_VARIANTS, *CAU_ABLATIONS)
    for ax, backbone in zip(axes[0], backbones, strict=True):
        part = data[data["backbone"] == backbone]
        stats = mean_std(part, "method", ["hit_u@1", "recall@10"])
        for method in ordered(stats.index, order):
            s = style(method)
            row = stats.loc[method]
            ax.errorbar(row["hit_u@1"], row["recall@10"], xerr=row["hit_u@1_std"],
                        yerr=row["recall@10_std"], ecolor=s.colour, linestyle="none",
                        capsize=3, alpha=0.7, zorder=2)
            ax.scatter(row["hit_u@1"], row["recall@10"], color=s.colour, marker=s.marker,
                       s=90, edgecolors="black", linewidths=0.6, label=s.label, zorder=3)
        ax.set_title(f"{BACKBONE_LABELS.get(backbone, backbone)} ({seeds_note(part)})")
        ax.set_xlabel("Hit_u@1 of forgotten items (lower = more forgotten)")
        ax.set_ylabel("test Recall@10 (higher = better)")
        ax.grid(alpha=0.3)
    handles: dict[str, object] = {}  # every panel's methods (the ablations are SASRec's)
    for ax in axes[0]:
        for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(name, handle)
    axes[0][-1].legend(handles.values(), handles.keys(), fontsize=8, loc="center left",
                       bbox_to_anchor=(1.01, 0.5))
    fig.suptitle("CAU: utility against memory of the forgotten items (error bars: std; "
                 "overlapping markers are equal)")
    return save(fig, path)


# ------------------------------------------------------------------------------ Table III


def grouped_bars(ax, data: pd.DataFrame, methods: Sequence[str]) -> None:
    metrics = (("test_hr@20", "HR@20"), ("test_ndcg@20", "NDCG@20"))
    stats = mean_std(data, "method", [c for c, _ in metrics])
    methods = [m for m in methods if m in stats.index]
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        s = style(method)
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(metrics))]
        tops = [stats.loc[method, c] for c, _ in metrics]
        errs = [stats.loc[method, f"{c}_std"] for c, _ in metrics]
        # the hatch takes the edge colour: white on a black bar, so that it shows
        ax.bar(xs, tops, width, yerr=errs, color=s.colour, hatch=s.hatch, capsize=3,
               edgecolor="white" if s.colour == "black" else "black", label=s.label,
               alpha=0.85)
        for x, top, err in zip(xs, tops, errs, strict=True):
            ax.annotate(f"{top:.3f}", (x, top + err), xytext=(0, 4), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(range(len(metrics)), [n for _, n in metrics])
    ax.set_ylabel("test score")
    ax.margins(y=0.2)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")


def table3_bars(results: Results, path: Path) -> Path:
    """Table III as bars: test HR@20 and NDCG@20, learning and unlearning methods."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, name, methods, title in (
            (left, "learning", (*LEARNING_TABLE3, "no-sharing"), "(a) Learning phase"),
            (right, "unlearning", (*UNLEARNING_TABLE3, "no-unlearning"),
             "(b) After unlearning")):
        if name in results:
            grouped_bars(ax, results[name], methods)
            ax.set_title(f"{title} ({seeds_note(results[name])}; error bar: std)")
        else:
            not_run(ax, f"{name}.csv")
            ax.set_title(title)
    fig.suptitle("Table III: test accuracy over all test users (full ranking)")
    return save(fig, path)


FIGURES: tuple[tuple[str, tuple[str, ...], Callable[[Results, Path], Path]], ...] = (
    ("learning_curves.png", ("curves",), learning_curves),
    ("fig4_time_storage.png", ("unlearning",), fig4),
    ("fig5_sweeps.png", ("sweep_users", "sweep_lambda", "sweep_snapshots", "sweep_gamma"),
     fig5),
    ("cau_plane.png", ("cau",), cau_plane),
    ("table3_bars.png", ("learning", "unlearning"), table3_bars),
)


def draw_all(folder: Path) -> list[Path]:
    """Every figure at least one of whose CSVs exists, into ``folder/figures/``."""
    folder = Path(folder)
    results = load_results(folder)
    return [draw(results, folder / "figures" / name) for name, needs, draw in FIGURES
            if any(n in results for n in needs)]
