"""Where FedShare forgets less than FRU and CUFRU: which users, which items, which term.

One learned federation (with canaries and FRU/CUFRU histories), then every unlearning method
and diagnostic runs of FedShare's Algorithm 2 that change one thing at a time: BPR alone (L_CU
weight 0), L_CU alone (no BPR), no remaining-data rounds, and Eq. 25 in InfoNCE's form (the
positive in the denominator, which stops pushing once the positive dominates). For the
unsharing users who still hold data it prints, per method:
- the canary exposure (mean over users) and how many users' exposure exceeds Retrain's;
- the Spearman correlation between a user's excess over Retrain and its remaining data;
- how far the canary rows of the item table moved from the learned table (cosine).

The diagnostic runs are measurements, not settings: they depart from the paper and are not
reported as methods.

Usage: ``python -m simulations.forgetting_gap [--seed 0] [--canaries 5] [--set key=value]``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from fedshare.data.interactions import Interactions
from fedshare.runconfig import data_key, load_data
from fedshare.unlearning.config import UnlearningConfig
from fedshare.unlearning.effect import canary_exposure
from fedshare.unlearning.phase import UnlearningOutcome, learn, unlearn
from fedshare.unlearning.remaining import add_canaries, remaining_data
from fedshare.unlearning.report import outcome_scorer
from simulations.experiment import resolve

CONFIGS = Path(__file__).parent / "configs"
DIAGNOSTICS = {"FedShare, BPR only": {"weight": 0.0},
               "FedShare, L_CU only": {"bpr": False},
               "FedShare, no remaining rounds": {"remaining_fl": False},
               "FedShare, InfoNCE form of Eq. 25": {"positive_in_denominator": True}}


def per_user_exposure(outcome: UnlearningOutcome, canaries: Interactions,
                      remaining: Interactions, known: Interactions, users: np.ndarray
                      ) -> np.ndarray:
    scorer = outcome_scorer(outcome)
    return np.array([canary_exposure(scorer, canaries.subset(canaries.users == u), remaining,
                                     known)["canary_exposure"] for u in users])


def gap_table(seed: int, sets: Sequence[str], canaries: int) -> pd.DataFrame:
    torch.set_num_threads(1)
    experiment = resolve(CONFIGS / "fedshare.toml", [f"seed={seed}", *sets])
    data, canary_set = add_canaries(load_data(data_key(experiment.run, {})), canaries, seed,
                                    common=True)
    config = experiment.config
    learned = learn(data, config, record=True)
    unlearning = UnlearningConfig()
    outcomes = {m: unlearn(learned, data, m, unlearning, config.rounds)
                for m in ("no-unlearning", "fedshare", "fru", "cufru", "retrain")}
    for name, change in DIAGNOSTICS.items():
        outcomes[name] = unlearn(learned, data, "fedshare", replace(unlearning, **change),
                                 config.rounds)
    remaining = remaining_data(data).split.train
    known = data.split.train.concat(data.split.valid).concat(data.split.test)
    counts = np.bincount(remaining.users, minlength=data.num_users)
    users = np.array([u for u in np.unique(canary_set.users) if counts[u] > 0])
    exposure = {m: per_user_exposure(o, canary_set, remaining, known, users)
                for m, o in outcomes.items()}
    canary_items = torch.from_numpy(np.unique(canary_set.items))
    learned_rows = learned.server.table[canary_items]
    rows = []
    for method, values in exposure.items():
        excess = values - exposure["retrain"]
        table = outcomes[method].federation.server.table
        rows.append({
            "method": method, "canary_exposure": values.mean(),
            "users_above_retrain": int((excess > 1e-9).sum()),
            "users_above_fru": int((values > exposure["fru"] + 1e-9).sum()),
            # Spearman: Pearson on ranks (pandas' own needs scipy)
            "spearman_excess_vs_remaining": pd.Series(excess).rank().corr(
                pd.Series(counts[users]).rank()),
            "canary_rows_cosine_to_learned": float(F.cosine_similarity(
                table[canary_items], learned_rows, dim=1).mean())})
    frame = pd.DataFrame(rows)
    frame.attrs["users"] = len(users)
    return frame


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.forgetting_gap",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--canaries", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    frame = gap_table(args.seed, args.set, args.canaries)
    print(f"{frame.attrs['users']} unsharing users who still hold data; seed {args.seed}")
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
