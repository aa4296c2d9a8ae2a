"""The storage and time study (FedShare paper Sec. V-E2, Fig. 4): what each unlearning method
keeps to be able to unlearn, where it keeps it, and how long unlearning takes.

Per seed the learning phase runs once, with ``snapshots = max(M)`` and the FRU and CUFRU
histories recorded (FRU at its paper's settings, :class:`FruSettings`); then FedShare with every
M, FRU, CUFRU and Retrain unlearn the same requests from copies of that one learned model.
Learning does not depend on M (snapshots are only read by unlearning), so FedShare with a
smaller M keeps the newest M of the same snapshots. FRU is also measured at the learning phase's
own sampling ("FRU (learning sampling)": every touched row is a candidate), from a second,
identical learning run that records that store (recording never changes learning).

Bytes are read from the run's storage ledger, the one every store reports to, never computed
from formulas (tests compare the two). Wall times are in-process compute: the communication FRU's
replay needs with every participant of every round is not part of them.

Writes ``storage_study.csv`` (one row per method and seed), ``storage_study.md``,
``summary.json`` (means per method; FedShare's bytes as a ratio to FRU's at the paper's
settings, to FRU's at the learning sampling and to CUFRU's; the mean bytes of an FRU client
store, over the clients holding one, and that as a fraction of the item table) and two bar
charts, ``storage.png`` and ``time.png``.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from fedshare.runconfig import data_key, load_data
from fedshare.storage_ledger import StorageLedger
from fedshare.unlearning.config import UnlearningConfig
from fedshare.unlearning.fru import KIND as FRU_KIND
from fedshare.unlearning.fru_selection import FruSettings
from fedshare.unlearning.phase import UnlearningOutcome, learn, unlearn
from fedshare.unlearning.replay import ReplayConfig
from fedshare.unlearning.report import unlearning_row
from simulations.experiment import leased_folder, resolve
from simulations.plans import plan_record

CONFIGS = Path(__file__).parent / "configs"
SNAPSHOTS = (1, 2, 3, 5, 10)
FRU_LABELS = {"FRU": "paper", "FRU (learning sampling)": "learning"}
COLUMNS = ("client_bytes", "server_bytes", "kept_bytes", "per_client_bytes", "table_bytes",
           "seconds", "test_hr@20", "test_ndcg@20", "forgotten_hr@20")
REPORTED = ("client_bytes", "server_bytes", "kept_bytes", "seconds", "test_hr@20",
            "test_ndcg@20", "forgotten_hr@20")


def per_client_bytes(ledger: StorageLedger) -> float:
    """Mean bytes of an FRU client store, over the clients that hold one (0 if none does)."""
    frame = ledger.frame()
    held = frame[(frame["kind"] == FRU_KIND) & (frame["bytes"] > 0)]["bytes"]
    return float(held.mean()) if len(held) else 0.0


def _row(label: str, outcome: UnlearningOutcome, data, seed: int, snapshots: int | None,
         per_client: float = 0.0) -> dict:
    full = unlearning_row(outcome, data, None, None)
    table = outcome.federation.server.table
    return {"seed": seed, "label": label, "method": outcome.method, "snapshots": snapshots,
            **{c: full[c] for c in REPORTED}, "per_client_bytes": per_client,
            "table_bytes": table.numel() * 4}


def study_cells(seed: int, sets: Sequence[str], snapshots: Sequence[int],
                unlearning: UnlearningConfig, replay: ReplayConfig,
                progress: Callable[[str], None] = print,
                fru: FruSettings | None = None) -> list[dict]:
    """Every method for one seed, from one learned federation (and FRU's other sampling from
    a second one: module docstring)."""
    fru = replace(fru or FruSettings(), sampling="paper")
    torch.set_num_threads(1)
    experiment = resolve(CONFIGS / "fedshare.toml",
                         [f"seed={seed}", *sets, f"snapshots={max(snapshots)}"])
    data = load_data(data_key(experiment.run, {}))
    config = experiment.config
    start = time.perf_counter()
    learned = learn(data, config, record=True, fru=fru)
    progress(f"seed {seed}: learned in {time.perf_counter() - start:.1f} s")
    learned_other = learn(data, config, record=True, fru=replace(fru, sampling="learning"))
    by_sampling = {"paper": learned, "learning": learned_other}
    rows = []
    for m in sorted(snapshots):
        federation = copy.deepcopy(learned)
        federation.server.snapshots.keep_last(m)
        outcome = unlearn(federation, data, "fedshare", unlearning, config.rounds, replay)
        rows.append(_row(f"FedShare (M={m})", outcome, data, seed, m))
    for label, sampling in FRU_LABELS.items():
        source = by_sampling[sampling]
        outcome = unlearn(source, data, "fru", unlearning, config.rounds, replay)
        rows.append(_row(label, outcome, data, seed, None, per_client_bytes(source.ledger)))
    for method, label in (("cufru", "CUFRU"), ("retrain", "Retrain")):
        outcome = unlearn(learned, data, method, unlearning, config.rounds, replay)
        rows.append(_row(label, outcome, data, seed, None))
    for row in rows:
        progress(f"seed {seed} {row['label']:>23}: {row['kept_bytes'] / 2**20:10.3f} MiB "
                 f"(clients {row['client_bytes'] / 2**20:.3f}) {row['seconds']:7.2f} s  "
                 f"test HR@20 {row['test_hr@20']:.4f}")
    return rows


def ratios(means: pd.DataFrame) -> dict[str, float]:
    """FedShare's bytes over FRU's (both samplings) and CUFRU's, every method's time over
    Retrain's, and FRU's mean client store in KiB and as a fraction of the item table."""
    out: dict[str, float] = {}
    for label in FRU_LABELS:
        out[f"per-client KiB {label}"] = float(means.loc[label, "per_client_bytes"] / 2**10)
        out[f"per-client / item table {label}"] = float(
            means.loc[label, "per_client_bytes"] / means.loc[label, "table_bytes"])
    for label in means.index:
        if label.startswith("FedShare"):
            for other in (*FRU_LABELS, "CUFRU"):
                out[f"bytes {label} / {other}"] = float(
                    means.loc[label, "kept_bytes"] / means.loc[other, "kept_bytes"])
        if label != "Retrain":
            out[f"seconds {label} / Retrain"] = float(
                means.loc[label, "seconds"] / means.loc["Retrain", "seconds"])
    return out


def to_markdown(means: pd.DataFrame) -> str:
    header = ("| method | on clients (MiB) | per client (KiB) | per client / item table | "
              "on server (MiB) | total (MiB) | unlearning (s) | test HR@20 | test NDCG@20 | "
              "forgotten HR@20 |")
    lines = [header, "|---" * 10 + "|"]
    for label, r in means.iterrows():
        per_client = (f"{r['per_client_bytes'] / 2**10:.1f} | "
                      f"{r['per_client_bytes'] / r['table_bytes']:.1%}"
                      if r["per_client_bytes"] else "- | -")
        lines.append(f"| {label} | {r['client_bytes'] / 2**20:.3f} | {per_client} | "
                     f"{r['server_bytes'] / 2**20:.3f} | {r['kept_bytes'] / 2**20:.3f} | "
                     f"{r['seconds']:.2f} | {r['test_hr@20']:.4f} | {r['test_ndcg@20']:.4f} | "
                     f"{r['forgotten_hr@20']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(means: pd.DataFrame, folder: Path) -> list[Path]:
    """Bar charts of bytes (client and server stacked, log scale) and of wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(means.index)
    paths = []
    fig, ax = plt.subplots(figsize=(9, 4))
    mib = means[["client_bytes", "server_bytes"]] / 2**20
    ax.bar(labels, mib["server_bytes"], label="server")
    ax.bar(labels, mib["client_bytes"], bottom=mib["server_bytes"], label="clients (sum)")
    ax.set_yscale("log")
    total = mib.sum(axis=1)
    ax.set_ylim(bottom=total[total > 0].min() / 4 if (total > 0).any() else 1e-3,
                top=max(float(total.max()), 1e-3) * 4)
    for x, value in enumerate(total):  # log axes cannot show 0 (Retrain): print every value
        ax.annotate(f"{value:.3g}", (x, max(value, ax.get_ylim()[0])), ha="center",
                    va="bottom", fontsize=8)
    ax.set_ylabel("bytes kept to unlearn (MiB, log)")
    ax.legend()
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    paths.append(folder / "storage.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar(labels, means["seconds"])
    for x, value in enumerate(means["seconds"]):
        ax.annotate(f"{value:.1f}", (x, value), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("unlearning wall time (s)")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    paths.append(folder / "time.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def storage_study(seeds: Sequence[int] = (0,), sets: Sequence[str] = (),
                  snapshots: Sequence[int] = SNAPSHOTS, unlearning: UnlearningConfig | None = None,
                  replay: ReplayConfig | None = None, out: str | Path = "runs",
                  progress: Callable[[str], None] = print, fru: FruSettings | None = None
                  ) -> tuple[Path, pd.DataFrame, dict]:
    if not snapshots or min(snapshots) < 1:
        raise ValueError("every M must be at least 1")
    unlearning, replay = unlearning or UnlearningConfig(), replay or ReplayConfig()
    fru = fru or FruSettings()
    # the data first (bad data fail before any folder is made), and the plan they report on
    data = load_data(data_key(resolve(CONFIGS / "fedshare.toml", list(sets)).run, {}))
    with leased_folder(out, "storage-study") as folder:
        rows = [r for seed in seeds
                for r in study_cells(seed, sets, snapshots, unlearning, replay, progress,
                                     fru)]
        frame = pd.DataFrame(rows)
        frame.to_csv(folder / "storage_study.csv", index=False)
        means = frame.groupby("label", sort=False)[list(COLUMNS)].mean()
        (folder / "storage_study.md").write_text(to_markdown(means))
        figures = ratios(means)
        plot(means, folder)
        (folder / "summary.json").write_text(json.dumps(
            {"ratios": figures, "methods": {k: {c: float(v) for c, v in r.items()}
                                            for k, r in means.iterrows()},
             "seeds": list(seeds), "snapshots": list(snapshots), "unlearning": unlearning.to_dict(),
             "replay": replay.to_dict(), "fru": fru.to_dict(), **plan_record([data])},
            indent=2))
        return folder, means, figures
