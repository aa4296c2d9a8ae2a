"""Judging the papers' claims on a results folder: one small function per claim id.

Every check compares means over seeds and is honest about noise: an ordering *holds* only if it
is the claimed one AND the gap exceeds the larger of the two standard deviations over seeds; a
gap inside that is "not resolved (within noise)"; the reversed ordering beyond it "does not
hold". A claim made of several orderings is "holds" when all hold, "partly" when some do, "does
not hold" when none does and one is reversed. A check whose CSV or methods are absent is
"not run". The report prints the verdict and the numbers it was judged on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise

import pandas as pd

from simulations.reproduce.readout import CAU_ABLATIONS, CAU_VARIANTS, MIB, label

HOLDS = "holds"
NOT_HOLD = "does not hold"
PARTLY = "partly"
NOISE = "not resolved (within noise)"
NOT_RUN = "not run"

Results = dict[str, pd.DataFrame]
Check = Callable[[Results], tuple[str, str]]
DEFAULT_CHECKS: dict[str, Check] = {}
METRICS = (("test_hr@20", "HR@20"), ("test_ndcg@20", "NDCG@20"))


class NotRun(Exception):
    """What a check needs is not in the results folder (the message says what)."""


def check(claim_id: str) -> Callable[[Callable[[Results], tuple[str, str]]], Check]:
    """Register a check under ``claim_id``; a :class:`NotRun` it raises becomes "not run"."""
    def register(fn: Callable[[Results], tuple[str, str]]) -> Check:
        def run(results: Results) -> tuple[str, str]:
            try:
                return fn(results)
            except NotRun as missing:
                return NOT_RUN, str(missing)
        run.__name__ = run.__qualname__ = fn.__name__
        run.__doc__ = fn.__doc__
        DEFAULT_CHECKS[claim_id] = run
        return run
    return register


def four(x: float) -> str:
    return f"{x:.4f}"


def secs(x: float) -> str:
    return f"{x:.1f}s"


def mib(x: float) -> str:
    return f"{x / MIB:.3f}MiB"


def compare(what: str, a_name: str, a: pd.Series, b_name: str, b: pd.Series,
            greater: bool = True, factor: float = 1.0, fmt: Callable[[float], str] = four
            ) -> tuple[str, str]:
    """Is mean(a) > factor * mean(b) (``greater``) or < it, by more than the larger std?"""
    a_mean, b_mean = float(a.mean()), factor * float(b.mean())
    a_std = float(a.std(ddof=1)) if len(a) > 1 else 0.0
    b_std = factor * float(b.std(ddof=1)) if len(b) > 1 else 0.0
    gap = (a_mean - b_mean) if greater else (b_mean - a_mean)
    noise = max(a_std, b_std)
    scaled = b_name if factor == 1.0 else f"{factor:g} x {b_name}"
    if min(len(a), len(b)) < 2:
        what = f"{what} [one seed: noise not measured]"
    sign = ">" if greater else "<"
    head = f"{what}: {a_name} {fmt(a_mean)}±{fmt(a_std)}"
    tail = f"{scaled} {fmt(b_mean)}±{fmt(b_std)}"
    if gap > noise and gap > 0:
        return HOLDS, f"{head} {sign} {tail} (gap {fmt(abs(gap))} > std {fmt(noise)})"
    if -gap > noise:
        return NOT_HOLD, (f"{head} vs {tail}: reversed, claimed {sign} (gap {fmt(abs(gap))} "
                          f"> std {fmt(noise)})")
    return NOISE, (f"{head} vs {tail}: within noise, claimed {sign} (gap {fmt(abs(gap))} "
                   f"<= std {fmt(noise)})")


def combine(verdicts: Sequence[str]) -> str:
    """One verdict for a claim made of several orderings (module docstring)."""
    if not verdicts:
        return NOT_RUN
    if all(v == HOLDS for v in verdicts):
        return HOLDS
    if HOLDS in verdicts:
        return PARTLY
    return NOT_HOLD if NOT_HOLD in verdicts else NOISE


def majority(verdicts: Sequence[str]) -> str:
    """For "in most cases" claims: holds when more than half hold clearly."""
    if sum(v == HOLDS for v in verdicts) * 2 > len(verdicts):
        return HOLDS
    if sum(v == NOT_HOLD for v in verdicts) * 2 > len(verdicts):
        return NOT_HOLD
    return NOISE if all(v == NOISE for v in verdicts) else PARTLY


def judged(parts: Sequence[tuple[str, str]], rule: Callable[[Sequence[str]], str] = combine,
           note: str = "") -> tuple[str, str]:
    """The claim's verdict and evidence; a ``note`` names what was not run, and a claim that
    holds on only part of what it covers is "partly"."""
    evidence = "; ".join(text for _, text in parts)
    verdict = rule([v for v, _ in parts])
    if note and verdict == HOLDS:
        verdict = PARTLY
    return verdict, (f"{note}; {evidence}" if note else evidence)


def frame(results: Results, name: str) -> pd.DataFrame:
    if name not in results:
        raise NotRun(f"{name}.csv absent")
    return results[name]


def values(data: pd.DataFrame, column: str, name: str = "", **where: object) -> pd.Series:
    """Per-seed values of ``column`` for the rows matching ``where`` (NotRun if none)."""
    mask = pd.Series(True, index=data.index)
    for key, value in where.items():
        mask &= data[key] == value
    picked = data.loc[mask, column].dropna()
    if picked.empty:
        shown = ", ".join(f"{k}={v}" for k, v in where.items())
        raise NotRun(f"no rows with {shown}{f' in {name}.csv' if name else ''}")
    return picked


def present(data: pd.DataFrame, methods: Sequence[str]) -> list[str]:
    return [m for m in methods if m in set(data["method"])]


def beats(data: pd.DataFrame, winner: str, losers: Sequence[str], greater: bool = True
          ) -> list[tuple[str, str]]:
    """``winner`` against each of ``losers`` on test HR@20 and NDCG@20."""
    a = {c: values(data, c, method=winner) for c, _ in METRICS}
    return [compare(name, label(winner), a[c], label(m), values(data, c, method=m), greater)
            for m in losers for c, name in METRICS]


def missing_note(wanted: Sequence[str], got: Sequence[str]) -> str:
    gone = [label(m) for m in wanted if m not in got]
    return f"not run: {', '.join(gone)}" if gone else ""


# ------------------------------------------------------------------ FedShare: Table III, IV


@check("shared-data-helps")
def shared_data_helps(results: Results) -> tuple[str, str]:
    """Sec. V-E1 (1): PDC-FRS, CDCGNNFed and FedShare beat FedShare-FedAvg "in most cases"."""
    data = frame(results, "learning")
    users = ("pdc-frs", "cdcgnnfed", "fedshare")
    got = present(data, users)
    if not got:
        raise NotRun("no method using shared data in learning.csv")
    parts = [p for m in got for p in beats(data, m, ["fedshare-fedavg"])]
    return judged(parts, majority, missing_note(users, got))


@check("fedshare-learning-best")
def fedshare_learning_best(results: Results) -> tuple[str, str]:
    """Sec. V-E1 (2): FedShare is best in the learning phase."""
    data = frame(results, "learning")
    rivals = ("fedshare-fedavg", "pdc-frs", "cdcgnnfed")
    got = present(data, rivals)
    if not got:
        raise NotRun("no learning baseline in learning.csv")
    return judged(beats(data, "fedshare", got), note=missing_note(rivals, got))


@check("fedshare-unlearning-beats-fru-cufru")
def fedshare_unlearning_beats(results: Results) -> tuple[str, str]:
    """Sec. V-E1 (3): after unlearning FedShare is more accurate than FRU and CUFRU."""
    data = frame(results, "unlearning")
    got = present(data, ("fru", "cufru"))
    if not got:
        raise NotRun("neither FRU nor CUFRU in unlearning.csv")
    return judged(beats(data, "fedshare", got), note=missing_note(("fru", "cufru"), got))


@check("retrain-upper-bound")
def retrain_upper_bound(results: Results) -> tuple[str, str]:
    """Sec. V-E1 (4): Retrain stays above FedShare after unlearning."""
    return judged(beats(frame(results, "unlearning"), "retrain", ["fedshare"]))


@check("fedshare-time")
def fedshare_time(results: Results) -> tuple[str, str]:
    """Sec. V-E2 (1): FedShare unlearns much faster than Retrain and is competitive with FRU
    and CUFRU (taken as: at most twice the faster of the two)."""
    data = frame(results, "unlearning")
    ours = values(data, "seconds", method="fedshare")
    parts = [compare("seconds", "FedShare", ours, "Retrain",
                     values(data, "seconds", method="retrain"), greater=False, fmt=secs)]
    got = present(data, ("fru", "cufru"))
    if got:
        fastest = min(got, key=lambda m: values(data, "seconds", method=m).mean())
        parts.append(compare("seconds (competitive: at most twice the faster of FRU, CUFRU)",
                             "FedShare", ours, label(fastest),
                             values(data, "seconds", method=fastest), greater=False,
                             factor=2.0, fmt=secs))
    return judged(parts, note=missing_note(("fru", "cufru"), got))


@check("fedshare-storage")
def fedshare_storage(results: Results) -> tuple[str, str]:
    """Sec. V-E2 (2): FedShare keeps fewer bytes to unlearn than FRU and CUFRU."""
    data = frame(results, "unlearning")
    got = present(data, ("fru", "cufru"))
    if not got:
        raise NotRun("neither FRU nor CUFRU in unlearning.csv")
    ours = values(data, "kept_bytes", method="fedshare")
    parts = [compare("bytes kept", "FedShare", ours, label(m),
                     values(data, "kept_bytes", method=m), greater=False, fmt=mib) for m in got]
    return judged(parts, note=missing_note(("fru", "cufru"), got))


def ablation(results: Results, name: str, variant: str) -> tuple[str, str]:
    return judged(beats(frame(results, name), "fedshare", [variant]))


@check("ablation-wo-cl")
def ablation_wo_cl(results: Results) -> tuple[str, str]:
    """Table IV (1): removing contrastive learning lowers accuracy."""
    return ablation(results, "learning", "wo-cl")


@check("ablation-wo-bpr")
def ablation_wo_bpr(results: Results) -> tuple[str, str]:
    """Table IV (2): removing the server's BPR loss lowers accuracy."""
    return ablation(results, "learning", "wo-bpr")


@check("ablation-wo-forgotten-graph")
def ablation_wo_forgotten_graph(results: Results) -> tuple[str, str]:
    """Table IV (3): forgotten views without the forgotten graph lower accuracy."""
    return ablation(results, "unlearning", "wo-forgotten-graph")


@check("ablation-wo-remaining-fl")
def ablation_wo_remaining_fl(results: Results) -> tuple[str, str]:
    """Table IV (4): skipping federated training on the remaining data lowers accuracy
    "further", i.e. also below w/o forgotten graph."""
    data = frame(results, "unlearning")
    parts = beats(data, "fedshare", ["wo-remaining-fl"])
    if "wo-forgotten-graph" in set(data["method"]):
        parts += beats(data, "wo-forgotten-graph", ["wo-remaining-fl"])
    return judged(parts)


# ------------------------------------------------------------------------ FedShare: Fig. 5


Points = list[tuple[object, pd.Series]]


def series(data: pd.DataFrame, x: str, column: str = "test_hr@20", order: str = "") -> Points:
    """Per-seed values of ``column`` at each ``x``, in increasing ``x`` (or increasing mean
    ``order``: the user groups go by the fraction shared, which varies a little by seed)."""
    groups = list(data.groupby(x, sort=True))
    if order:
        groups.sort(key=lambda g: g[1][order].mean())
    return [(v, g[column].dropna()) for v, g in groups]


def trend(points: Points, name: str) -> str:
    return f"{name}: " + ", ".join(f"{x}: {s.mean():.4f}" for x, s in points)


@check("sweep-user-ratio")
def sweep_user_ratio(results: Results) -> tuple[str, str]:
    """Fig. 5a: every method improves as more users share (most vs least shared; a clear drop
    between neighbouring ratios makes it "partly")."""
    data = frame(results, "sweep_users")
    parts, lines, drops = [], [], []
    for method, part in data.groupby("method", sort=False):
        points = series(part, "groups", order="shared_fraction")
        if len(points) < 2:
            continue
        lines.append(trend(points, label(method)))
        parts.append(compare("HR@20", f"{label(method)} at {points[-1][0]}", points[-1][1],
                             f"at {points[0][0]}", points[0][1]))
        drops += [f"{label(method)} {x_lo} -> {x_hi}"
                  for (x_lo, lo), (x_hi, hi) in pairwise(points)
                  if compare("", "", hi, "", lo)[0] == NOT_HOLD]
    if not parts:
        raise NotRun("sweep_users.csv has fewer than two ratios per method")
    verdict, evidence = judged(parts)
    if drops and verdict == HOLDS:
        verdict = PARTLY
    note = f"clear drops between neighbours: {', '.join(drops)}" if drops else ""
    return verdict, "; ".join(x for x in (evidence, note, *lines) if x)


@check("sweep-lambda1")
def sweep_lambda1(results: Results) -> tuple[str, str]:
    """Fig. 5b: accuracy drops when lambda1 is too small or too large (an interior peak)."""
    points = series(frame(results, "sweep_lambda"), "lambda1")
    if len(points) < 3:
        raise NotRun("sweep_lambda.csv has fewer than three lambda1 values")
    peak_x, peak = max(points[1:-1], key=lambda p: p[1].mean())
    (lo_x, lo), (hi_x, hi) = points[0], points[-1]
    parts = [compare("HR@20", f"lambda1={peak_x}", peak, f"lambda1={lo_x}", lo),
             compare("HR@20", f"lambda1={peak_x}", peak, f"lambda1={hi_x}", hi)]
    verdict, evidence = judged(parts)
    return verdict, f"{evidence}; {trend(points, 'FedShare')}"


@check("sweep-snapshots")
def sweep_snapshots(results: Results) -> tuple[str, str]:
    """Fig. 5c: accuracy improves with more snapshots M and levels off (the last step gains
    less than the first; otherwise "partly")."""
    points = series(frame(results, "sweep_snapshots"), "snapshots")
    if len(points) < 2:
        raise NotRun("sweep_snapshots.csv has fewer than two values of M")
    verdict, evidence = judged([compare("HR@20", f"M={points[-1][0]}", points[-1][1],
                                        f"M={points[0][0]}", points[0][1])])
    note = ""
    if len(points) >= 3:
        first = points[1][1].mean() - points[0][1].mean()
        last = points[-1][1].mean() - points[-2][1].mean()
        levels = last <= max(first, 0.0)
        note = (f"gain of the last step {last:+.4f} vs the first {first:+.4f}: "
                f"{'levels off' if levels else 'does not level off'}")
        if not levels and verdict == HOLDS:
            verdict = PARTLY
    return verdict, "; ".join(x for x in (evidence, note, trend(points, "FedShare")) if x)


@check("sweep-gamma")
def sweep_gamma(results: Results) -> tuple[str, str]:
    """Fig. 5d: every method loses accuracy as the unsharing ratio gamma grows, and FedShare
    beats FRU and CUFRU at every gamma."""
    data = frame(results, "sweep_gamma")
    parts, lines = [], []
    for method, part in data.groupby("method", sort=False):
        points = series(part, "gamma")
        lines.append(trend(points, label(method)))
        if len(points) >= 2:
            parts.append(compare("HR@20", f"{label(method)} at gamma={points[0][0]}",
                                 points[0][1], f"at gamma={points[-1][0]}", points[-1][1]))
    for gamma, part in data.groupby("gamma", sort=True):
        for rival in present(part, ("fru", "cufru")):
            if "fedshare" in set(part["method"]):
                parts.append(compare(f"HR@20 at gamma={gamma}", "FedShare",
                                     values(part, "test_hr@20", method="fedshare"),
                                     label(rival), values(part, "test_hr@20", method=rival)))
    if not parts:
        raise NotRun("sweep_gamma.csv has one gamma and no FedShare-vs-baseline pair")
    verdict, evidence = judged(parts)
    return verdict, "; ".join([evidence, *lines])


# ----------------------------------------------------------------------------- CAU: Tables


Parts = list[tuple[str, str]]


def per_backbone(results: Results, judge: Callable[[str, pd.DataFrame], Parts]) -> Parts:
    """``judge`` on each backbone of cau.csv; a backbone missing a method is skipped (named in
    the evidence), and only when every backbone is is the claim "not run"."""
    parts: Parts = []
    skipped = []
    for backbone, part in frame(results, "cau").groupby("backbone", sort=False):
        try:
            parts += judge(str(backbone), part)
        except NotRun as missing:
            skipped.append(f"{backbone}: {missing}")
    if not parts:
        raise NotRun("; ".join(skipped) or "cau.csv has no comparable rows")
    return parts + [("", f"skipped {s}") for s in skipped]


def cau_judged(results: Results, judge: Callable[[str, pd.DataFrame], Parts],
               rule: Callable[[Sequence[str]], str] = combine) -> tuple[str, str]:
    parts = per_backbone(results, judge)
    return judged([p for p in parts if p[0]], rule,
                  note="; ".join(text for v, text in parts if not v))


def variants(part: pd.DataFrame) -> list[str]:
    got = present(part, CAU_VARIANTS)
    if not got:
        raise NotRun("no CAU variant")
    return got


def best_cau(part: pd.DataFrame) -> str:
    """The CAU variant with the highest mean U-score on this backbone."""
    return max(variants(part), key=lambda m: values(part, "u_score", method=m).mean())


@check("cau-keeps-recall")
def cau_keeps_recall(results: Results) -> tuple[str, str]:
    """CAU Table 1: every CAU variant keeps Recall@10 at 92% of Original's or more."""
    def judge(b: str, p: pd.DataFrame) -> Parts:
        original = values(p, "recall@10", method="original")
        return [compare(f"{b} Recall@10", label(m), values(p, "recall@10", method=m),
                        "Original", original, factor=0.92) for m in variants(p)]
    return cau_judged(results, judge)


@check("cau-forgets-more-than-retrain")
def cau_forgets_more(results: Results) -> tuple[str, str]:
    """CAU Table 2: every CAU variant has a lower Hit_u@1 than Retrain."""
    def judge(b: str, p: pd.DataFrame) -> Parts:
        retrain = values(p, "hit_u@1", method="retrain")
        return [compare(f"{b} Hit_u@1", label(m), values(p, "hit_u@1", method=m), "Retrain",
                        retrain, greater=False) for m in variants(p)]
    return cau_judged(results, judge)


def best_u_above(results: Results, rivals: Sequence[str]) -> tuple[str, str]:
    def judge(b: str, p: pd.DataFrame) -> Parts:
        got = present(p, rivals)
        if not got:
            raise NotRun(f"none of {', '.join(label(r) for r in rivals)}")
        best = best_cau(p)
        ours = values(p, "u_score", method=best)
        return [compare(f"{b} U-score", f"best CAU ({label(best)})", ours, label(m),
                        values(p, "u_score", method=m)) for m in got]
    return cau_judged(results, judge)


@check("cau-best-u-score")
def cau_best_u_score(results: Results) -> tuple[str, str]:
    """CAU Tables 2 and 4: the best CAU U-score is above Retrain's and every ablation's."""
    return best_u_above(results, ("retrain", *CAU_ABLATIONS))


def table4(results: Results) -> Results:
    """CAU's Table 4 is on SASRec alone: its claims are judged there (another backbone with
    no ablation rows does not make them "partly")."""
    if "cau" not in results:
        return results
    cau = results["cau"]
    return {**results, "cau": cau[cau["backbone"] == "sasrec"]}


@check("cau-ps-cu-help")
def cau_ps_cu_help(results: Results) -> tuple[str, str]:
    """CAU Table 4: Pareto solving and curriculum each help (best CAU U above w/o PS, w/o CU)."""
    return best_u_above(table4(results), ("wo-ps", "wo-cu"))


@check("cau-soft-beats-hard")
def cau_soft_beats_hard(results: Results) -> tuple[str, str]:
    """CAU Table 2: soft sampling has the higher U-score for most difficulty/backbone pairs."""
    def judge(b: str, p: pd.DataFrame) -> Parts:
        pairs = [(f"cau-{d}-soft", f"cau-{d}-hard") for d in ("gradient", "embedding")]
        pairs = [(s, h) for s, h in pairs if len(present(p, (s, h))) == 2]
        if not pairs:
            raise NotRun("no soft/hard pair of CAU variants")
        return [compare(f"{b} U-score", label(s), values(p, "u_score", method=s), label(h),
                        values(p, "u_score", method=h)) for s, h in pairs]
    return cau_judged(results, judge, majority)


@check("cau-time")
def cau_time(results: Results) -> tuple[str, str]:
    """CAU Table 3: CAU unlearns at least 10x faster than Retrain (the paper reports 13x)."""
    def judge(b: str, p: pd.DataFrame) -> Parts:
        retrain = values(p, "seconds", method="retrain")
        return [compare(f"{b} seconds", label(m), values(p, "seconds", method=m), "Retrain",
                        retrain, greater=False, factor=0.1, fmt=secs) for m in variants(p)]
    return cau_judged(results, judge)


@check("cau-wo-rl-collapses")
def cau_wo_rl_collapses(results: Results) -> tuple[str, str]:
    """CAU Table 4: gradient ascent alone (w/o the retaining terms) loses more than half of
    Original's Recall@10."""
    def judge(b: str, p: pd.DataFrame) -> Parts:
        return [compare(f"{b} Recall@10", "GA", values(p, "recall@10", method="ga"),
                        "Original", values(p, "recall@10", method="original"),
                        greater=False, factor=0.5)]
    return cau_judged(table4(results), judge)
