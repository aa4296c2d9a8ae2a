"""Markdown pieces of the report and the look-up of a paper's value beside ours.

Numbers are printed one way everywhere (scores to 4 decimals, seconds to 1, MiB to 3) so that
columns line up and a reader never wonders about rounding. The papers' values come as the long
frame of ``load_paper_numbers`` (paper, table, row, phase, method, dataset, backbone, metric,
value, note); a dataset the paper does not report is replaced by ML-1M, the nearest, and the
column header says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from simulations.reproduce.readout import dataset_label

NEAREST = "ml-1m"
ROMAN = {"i": "1", "ii": "2", "iii": "3", "iv": "4", "v": "5", "vi": "6"}
DASH = "—"
COLUMNS = ("paper", "table", "row", "phase", "method", "dataset", "backbone", "metric", "value",
           "note")


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table; a cell's pipes and line breaks are escaped."""
    def clean(cell: object) -> str:
        return str(cell).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(clean(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(clean(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def ms(stats: pd.DataFrame | None, key: object, column: str, digits: int = 4,
       scale: float = 1.0, missing: str = "not run") -> str:
    """``mean ± std`` of ``column`` for index ``key`` of a :func:`readout.mean_std` frame."""
    if stats is None or key not in stats.index or pd.isna(stats.loc[key, column]):
        return missing
    mean, std = stats.loc[key, column] / scale, stats.loc[key, f"{column}_std"] / scale
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def number(value: float | None, digits: int = 4) -> str:
    return DASH if value is None or pd.isna(value) else f"{value:.{digits}f}"


def figure(folder: Path, name: str, alt: str) -> str:
    """The inline image if the figure was drawn, else a line saying it was not."""
    if (Path(folder) / "figures" / name).is_file():
        return f"![{alt}](figures/{name})\n"
    return f"_Figure `{name}` not drawn (run `draw_all` before the report)._\n"


def table_key(value: object) -> str:
    """"III", "Table III", "table3" and 3 all name table 3."""
    text = str(value).lower().replace("table", "").strip()
    return ROMAN.get(text, text)


def blank(value: object) -> bool:
    return value is None or (isinstance(value, float) and pd.isna(value)) or str(value) == ""


class PaperValues:
    """One paper's values, looked up by table, method, metric, dataset (and phase, backbone)."""

    def __init__(self, numbers: pd.DataFrame, paper: str, dataset: str):
        if numbers.empty:
            numbers = pd.DataFrame(columns=COLUMNS)
        rows = numbers[numbers["paper"].astype(str).str.lower().str.startswith(paper)].copy()
        rows["table_key"] = rows["table"].map(table_key)
        self.rows, self.dataset = rows, dataset

    def in_table(self, table_no: str) -> pd.DataFrame:
        return self.rows[self.rows["table_key"] == table_no]

    def source(self, table_no: str) -> tuple[str, str]:
        """The paper dataset shown beside ours, and the column header that says which."""
        datasets = list(dict.fromkeys(self.in_table(table_no)["dataset"].astype(str)))
        if self.dataset in datasets:
            return self.dataset, f"paper, {dataset_label(self.dataset)}"
        if NEAREST in datasets:
            kind = "nearest" if self.dataset.startswith("ml-") else "stand-in"
            return NEAREST, f"paper, ML-1M ({kind}; no {self.dataset} in the paper)"
        if datasets:
            return datasets[0], (f"paper, {dataset_label(datasets[0])} "
                                 f"(the only dataset; no {self.dataset} in the paper)")
        return NEAREST, "paper (no values)"

    def value(self, table_no: str, method: str, metric: str, phase: str | None = None,
              backbone: str | None = None) -> float | None:
        """The paper's value; a CAU variant falls back to the paper's plain "cau" row."""
        rows = self.in_table(table_no)
        rows = rows[(rows["metric"] == metric) & (rows["dataset"] == self.source(table_no)[0])]
        if phase is not None:
            rows = rows[rows["phase"].map(blank) | (rows["phase"] == phase)]
        if backbone is not None:
            rows = rows[rows["backbone"].map(blank) | (rows["backbone"] == backbone)]
        for key in (method, "cau") if method.startswith("cau-") else (method,):
            hit = rows[rows["method"] == key]
            if len(hit):
                return float(hit["value"].iloc[0])
        return None

    def methods(self, table_no: str) -> list[str]:
        return list(dict.fromkeys(self.in_table(table_no)["method"].astype(str)))

    def backbones(self, table_no: str) -> list[str]:
        found = self.in_table(table_no)["backbone"]
        return list(dict.fromkeys(str(b) for b in found if not blank(b)))
