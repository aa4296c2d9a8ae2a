"""Reading a ``fedshare reproduce`` results folder, and the names and styles every figure and
table of the report shares, so that a method looks and reads the same everywhere.

Every CSV is optional: :func:`load_results` returns only those that exist (and have rows), and
each consumer says "not run" for what is missing instead of failing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

CSV_NAMES = ("tuning", "learning", "curves", "unlearning", "sweep_users", "sweep_lambda",
             "sweep_snapshots", "sweep_gamma", "cau")
MIB = float(2 ** 20)

LEARNING_TABLE3 = ("fedshare-fedavg", "pdc-frs", "cdcgnnfed", "fedshare")
UNLEARNING_TABLE3 = ("retrain", "fru", "cufru", "fedshare")
LEARNING_ABLATIONS = ("fedshare", "wo-cl", "wo-bpr")
UNLEARNING_ABLATIONS = ("fedshare", "wo-forgotten-graph", "wo-remaining-fl")
UNLEARNING_FIG4 = ("fedshare", "wo-forgotten-graph", "wo-remaining-fl", "fru", "cufru",
                   "retrain")
CAU_VARIANTS = ("cau-gradient-hard", "cau-gradient-soft", "cau-embedding-hard",
                "cau-embedding-soft")
CAU_ABLATIONS = ("ga", "wo-ps", "wo-cu")


@dataclass(frozen=True)
class Style:
    """How one method is told apart without the code: a label, a colour, a marker, a line
    style and a hatch (bars)."""

    label: str
    colour: str
    marker: str
    line: str = "-"
    hatch: str = ""


STYLES: dict[str, Style] = {
    "fedshare": Style("FedShare", "tab:red", "o", "-", ""),
    "fedshare-fedavg": Style("FedShare-FedAvg", "tab:blue", "s", "--", "//"),
    "pdc-frs": Style("PDC-FRS", "tab:green", "^", "-.", "\\\\"),
    "cdcgnnfed": Style("CDCGNNFed", "tab:purple", "D", ":", "xx"),
    "wo-cl": Style("w/o CL", "tab:orange", "v", "--", ".."),
    "wo-bpr": Style("w/o BPR", "tab:brown", "P", "-.", "oo"),
    "no-sharing": Style("no sharing", "tab:gray", "X", ":", "--"),
    "no-unlearning": Style("no unlearning", "tab:gray", "X", ":", "--"),
    "wo-forgotten-graph": Style("w/o forgotten graph", "tab:orange", "v", "--", ".."),
    "wo-remaining-fl": Style("w/o remaining FL", "tab:brown", "P", "-.", "oo"),
    "fru": Style("FRU", "tab:blue", "s", "--", "//"),
    "cufru": Style("CUFRU", "tab:green", "^", "-.", "\\\\"),
    "retrain": Style("Retrain", "black", "D", ":", "xx"),
    "original": Style("Original", "black", "o", "-", ""),
    "ga": Style("GA (w/o RL)", "tab:red", "X", "--", "//"),
    "wo-ps": Style("w/o PS", "tab:pink", "v", "-.", ".."),
    "wo-cu": Style("w/o CU", "tab:brown", "^", ":", "oo"),
    "cau-gradient-hard": Style("CAU+gradient+hard", "tab:blue", "P", "-", "\\\\"),
    "cau-gradient-soft": Style("CAU+gradient+soft", "tab:cyan", "p", "--", "xx"),
    "cau-embedding-hard": Style("CAU+embedding+hard", "tab:purple", "*", "-.", "++"),
    "cau-embedding-soft": Style("CAU+embedding+soft", "tab:orange", "h", ":", "--"),
    "cau": Style("CAU", "tab:blue", "P", "-", ""),
    "sisa": Style("SISA", "tab:olive", "s", "-", ""),
    "sru": Style("SRU", "tab:olive", "D", "-", ""),
}
BACKBONE_LABELS = {"sasrec": "SASRec", "gru4rec": "GRU4Rec", "bert4rec": "BERT4Rec"}
DATASET_LABELS = {"ml-100k": "ML-100K", "ml-1m": "ML-1M", "fashion": "Fashion",
                  "video-games": "Video Games", "beauty": "Beauty"}
METRIC_LABELS = {"hr@20": "HR@20", "ndcg@20": "NDCG@20", "recall@10": "Recall@10",
                 "recall@20": "Recall@20", "ndcg@10": "NDCG@10", "hit_u@1": "Hit_u@1",
                 "hit_u@5": "Hit_u@5", "u_score": "U-score", "minutes": "minutes"}


def style(method: str) -> Style:
    """The method's style; an unknown key gets its own name and matplotlib's defaults."""
    return STYLES.get(method, Style(method, "tab:gray", "o"))


def label(method: str) -> str:
    return style(method).label


def dataset_label(dataset: str) -> str:
    return DATASET_LABELS.get(dataset, dataset)


def load_results(folder: Path) -> dict[str, pd.DataFrame]:
    """Every CSV of the schema that exists in ``folder`` and has rows, by its stem."""
    results = {}
    for name in CSV_NAMES:
        path = Path(folder) / f"{name}.csv"
        if path.is_file():
            frame = pd.read_csv(path)
            if len(frame):
                results[name] = frame
    return results


def load_json(folder: Path, name: str) -> dict:
    """``folder/name`` as a dict, or {} when absent (a partial run may not have written it)."""
    path = Path(folder) / name
    return json.loads(path.read_text()) if path.is_file() else {}


def mean_std(frame: pd.DataFrame, by: str | Sequence[str], columns: Sequence[str]
             ) -> pd.DataFrame:
    """Mean and standard deviation over seeds (columns ``<c>`` and ``<c>_std``); one seed
    has std 0, since nothing says how noisy it is, and the report names the seed count."""
    grouped = frame.groupby(list([by] if isinstance(by, str) else by), sort=False)
    means = grouped[list(columns)].mean()
    stds = grouped[list(columns)].std(ddof=1).fillna(0.0).add_suffix("_std")
    out = means.join(stds)
    out["n"] = grouped.size()
    return out


def ordered(present: Sequence[str], order: Sequence[str]) -> list[str]:
    """``present`` in the order of ``order``, unknown keys last (in their own order)."""
    present = list(dict.fromkeys(present))
    return [m for m in order if m in present] + [m for m in present if m not in order]
