"""The CAU part of the report (CAU paper Tables 1-4): ours per backbone beside the paper's.

What the paper has and we never built (SISA, SRU, the BERT4Rec backbone) is listed as "not
built" rather than dropped, so the reader sees the whole table. Times are compared as ratios to
Retrain only: absolute times (our seconds, federated, on another dataset and machine; the
paper's minutes) are not comparable.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from simulations.reproduce.markdown import DASH, PaperValues, figure, ms, number, table
from simulations.reproduce.readout import (
    BACKBONE_LABELS,
    CAU_ABLATIONS,
    CAU_VARIANTS,
    METRIC_LABELS,
    label,
    mean_std,
    ordered,
)

NOT_BUILT = {"sisa", "sru", "bert4rec"}
TABLE12 = ("original", "retrain", "sisa", "sru", *CAU_VARIANTS)
TABLE1_METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")
TABLE2_METRICS = ("hit_u@1", "hit_u@5", "u_score")
TABLE4_METRICS = ("ndcg@10", "recall@10", "hit_u@1", "u_score")


def backbone_label(backbone: str) -> str:
    return BACKBONE_LABELS.get(backbone, backbone)


def ours(stats: pd.DataFrame | None, method: str, metric: str, digits: int = 4) -> str:
    if method in NOT_BUILT:
        return "not built"
    return ms(stats, method, metric, digits)


def per_backbone(data: pd.DataFrame | None, backbone: str, columns: Sequence[str]
                 ) -> pd.DataFrame | None:
    if data is None or backbone not in set(data["backbone"]):
        return None
    return mean_std(data[data["backbone"] == backbone], "method", list(columns))


def metric_table(data: pd.DataFrame | None, paper: PaperValues, table_no: str,
                 methods: Sequence[str], metrics: Sequence[str], backbones: Sequence[str]
                 ) -> str:
    """Ours beside the paper's for every metric, one block of rows per backbone."""
    _, source = paper.source(table_no)
    header = ["Backbone", "Method"]
    for metric in metrics:
        header += [f"{METRIC_LABELS[metric]} ours", f"{METRIC_LABELS[metric]} {source}"]
    rows = []
    for backbone in backbones:
        stats = per_backbone(data, backbone, metrics)
        if backbone in NOT_BUILT:
            rows.append([backbone_label(backbone), "all methods",
                         *(["not built", DASH] * len(metrics))])
            continue
        for method in methods:
            row = [backbone_label(backbone), label(method)]
            for metric in metrics:
                row += [ours(stats, method, metric),
                        number(paper.value(table_no, method, metric, backbone=backbone))]
            rows.append(row)
    return table(header, rows)


def time_table(data: pd.DataFrame | None, paper: PaperValues, backbones: Sequence[str]) -> str:
    """Table 3: our seconds and the paper's minutes, each also as a ratio to Retrain."""
    _, source = paper.source("3")
    rows = []
    for backbone in backbones:
        stats = per_backbone(data, backbone, ["seconds"])
        retrain_minutes = paper.value("3", "retrain", "minutes", backbone=backbone)
        for method in ("retrain", "sisa", "sru", *CAU_VARIANTS):
            minutes = paper.value("3", method, "minutes", backbone=backbone)
            mine = ours(stats, method, "seconds", 1)
            own_ratio = DASH
            if stats is not None and {method, "retrain"} <= set(stats.index):
                own_ratio = f"{stats.loc[method, 'seconds'] / stats.loc['retrain', 'seconds']:.3f}"
            paper_ratio = (DASH if minutes is None or not retrain_minutes
                           else f"{minutes / retrain_minutes:.3f}")
            rows.append([backbone_label(backbone), label(method), mine, own_ratio,
                         number(minutes, 1), paper_ratio])
    return table(["Backbone", "Method", "seconds ours", "x Retrain ours",
                  f"minutes {source}", "x Retrain paper"], rows)


def cau_section(folder: Path, results: dict[str, pd.DataFrame], paper: PaperValues,
                dataset: str) -> str:
    """Tables 1-4 and the plane figure, or one "not run" line without cau.csv."""
    data = results.get("cau")
    lines = ["## CAU Tables 1-4: session-based unlearning", ""]
    if data is None:
        return "\n".join([*lines, "_cau.csv absent: not run._", ""])
    lines += [f"Ours: {dataset}, mean ± std over {data['seed'].nunique()} seeds, "
                  "federated training of each backbone. SISA, SRU and BERT4Rec: not built.", ""]
    built = list(data["backbone"].unique())
    backbones = ordered([*built, *paper.backbones("1")], ("sasrec", "gru4rec", "bert4rec"))
    extra = [m for m in data["method"].unique() if m not in TABLE12 and m not in CAU_ABLATIONS]
    lines += ["### Table 1: recommendation after unlearning", "",
              metric_table(data, paper, "1", [*TABLE12, *extra], TABLE1_METRICS, backbones),
              "### Table 2: unlearning effectiveness (Hit_u lower = more forgotten)", "",
              metric_table(data, paper, "2", [*TABLE12, *extra], TABLE2_METRICS, backbones),
              "### Table 3: unlearning time", "",
              "Ratios to Retrain are comparable; absolute times are not (the paper's minutes "
              "are centralised on its own hardware and dataset). Our Retrain is federated "
              "training on the remaining sessions, timed as this simulation computes it "
              "(Protocol: cau).", "",
              time_table(data, paper, built),
              "### Table 4: ablations (the paper's are SASRec only)", "",
              metric_table(data, paper, "4", [*CAU_VARIANTS, *CAU_ABLATIONS], TABLE4_METRICS,
                           ordered(built, ("sasrec", "gru4rec"))),
              figure(folder, "cau_plane.png", "CAU: Recall@10 against Hit_u@1")]
    return "\n".join(lines)
