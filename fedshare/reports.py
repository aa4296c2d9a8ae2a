"""Summaries of data and runs, as dicts, text and tables."""

from __future__ import annotations

import pandas as pd

from fedshare.data.prepared import PreparedData


def metrics_frame(rounds: list[dict], validations: list[dict]) -> pd.DataFrame:
    """``metrics.csv``: one row per round (who trained, elapsed time), validation metrics on
    the rounds that were validated."""
    frame = pd.DataFrame(rounds)
    if not validations:
        return frame
    valid = pd.DataFrame(validations).drop(columns=["seconds"], errors="ignore")
    return frame.merge(valid, on="round", how="left") if len(frame) else valid


def data_stats(data: PreparedData) -> dict:
    """Sizes of a dataset, its split and its sharing plan (``fedshare data stats``)."""
    split, plan = data.split, data.plan
    train = split.train
    return {
        "dataset": data.dataset,
        "users": data.num_users,
        "items": data.num_items,
        "interactions": len(train) + len(split.valid) + len(split.test),
        "split": {"train": len(train), "valid": len(split.valid), "test": len(split.test)},
        "split_seed": data.split_seed,
        "sharing_groups": plan.group_sizes(),
        "interactions_by_use": {
            "local": int((~plan.shared).sum()),
            "shared": int(plan.shared.sum()),
            "to_unlearn": int(plan.unlearn.sum()),
        },
        "unsharing_users": len(plan.unsharing_users(train)),
        "sharing": plan.config.to_dict(),
        "fingerprint": data.fingerprint(),
    }


def format_stats(stats: dict) -> str:
    s, g, use = stats["split"], stats["sharing_groups"], stats["interactions_by_use"]
    lines = [
        f"dataset        {stats['dataset']}",
        f"users          {stats['users']:,}",
        f"items          {stats['items']:,}",
        f"interactions   {stats['interactions']:,}",
        f"split          train {s['train']:,} / valid {s['valid']:,} / test {s['test']:,}"
        f"  (seed {stats['split_seed']})",
        f"sharing groups full {g['full']:,} / partial {g['partial']:,} / none {g['none']:,}",
        f"training data  local {use['local']:,} / shared {use['shared']:,}"
        f" / to unlearn {use['to_unlearn']:,} ({stats['unsharing_users']:,} users unshare)",
    ]
    return "\n".join(lines)
