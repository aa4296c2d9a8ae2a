"""``report.md`` of a reproduction: what was run and how, our numbers beside the papers', the
figures, and a verdict on every claim with the numbers it was judged on.

Every section reads from whatever CSVs the folder holds and says "not run" for the rest, so a
partial run still gets an honest report. The papers' numbers and claims are loaded lazily (from
:mod:`simulations.reproduce.paper`) unless given, so tests and partial checkouts can inject
their own.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pandas as pd

from fedshare.atomic import write_atomically
from simulations.reproduce.claims import DEFAULT_CHECKS, NOT_RUN
from simulations.reproduce.markdown import DASH, PaperValues, figure, ms, number, table
from simulations.reproduce.readout import (
    LEARNING_ABLATIONS,
    LEARNING_TABLE3,
    MIB,
    UNLEARNING_ABLATIONS,
    UNLEARNING_FIG4,
    UNLEARNING_TABLE3,
    dataset_label,
    label,
    load_json,
    load_results,
    mean_std,
    ordered,
)
from simulations.reproduce.report_cau import cau_section

Results = dict[str, pd.DataFrame]
Check = Callable[[Results], tuple[str, str]]
SCORES = ["test_hr@20", "test_ndcg@20"]
NOT_IN_PAPER = "not in the paper"
PAPERS = {"fedshare": "FedShare", "cau": "CAU"}


def write_report(folder: Path, numbers: pd.DataFrame | None = None,
                 claims: Sequence[Mapping] | None = None,
                 checks: Mapping[str, Check] | None = None) -> Path:
    """Write ``folder/report.md`` (atomically) and return its path. ``numbers`` and ``claims``
    default to the papers' (``load_paper_numbers``, ``load_claims``), ``checks`` to
    :data:`claims.DEFAULT_CHECKS`. Draw the figures first (``figures.draw_all``) to have
    them inline."""
    folder = Path(folder)
    if numbers is None or claims is None:
        from simulations.reproduce.paper import load_claims, load_paper_numbers

        numbers = load_paper_numbers() if numbers is None else numbers
        claims = load_claims() if claims is None else claims
    text = render(folder, numbers, list(claims), dict(DEFAULT_CHECKS if checks is None
                                                      else checks))
    path = folder / "report.md"
    write_atomically(path, lambda fh: fh.write(text), "w")
    return path


def render(folder: Path, numbers: pd.DataFrame, claims: list[Mapping],
           checks: dict[str, Check]) -> str:
    results = load_results(folder)
    manifest = load_json(folder, "manifest.json")
    dataset = str(manifest.get("dataset", "ml-100k"))
    paper = PaperValues(numbers, "fedshare", dataset)
    parts = [header(manifest), protocol(manifest, load_json(folder, "chosen.json"), results),
             table3(folder, results, paper), table4(results, paper), fig4(folder, results),
             fig5(folder, results), curves(folder, results),
             cau_section(folder, results, PaperValues(numbers, "cau", dataset), dataset),
             claims_section(results, claims, checks)]
    return "\n".join(parts)


# ------------------------------------------------------------------------- header, protocol


def duration(seconds: float) -> str:
    minutes, secs = divmod(float(seconds), 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{seconds:.1f} s ({hours} h {minutes} min {secs:.0f} s)"


def header(manifest: dict) -> str:
    lines = ["# FedShare and CAU: reproduction report", ""]
    if not manifest:
        return "\n".join([*lines, "_manifest.json absent: command, dates and seeds unknown; "
                           "the dataset is taken to be ml-100k (the default)._", ""])
    command = manifest.get("command") or (
        f"fedshare reproduce {manifest.get('target', '?')}"
        + (" --quick" if manifest.get("quick") else ""))
    made = "" if manifest.get("command") else " (from the manifest's target and quick flag)"
    seeds = ", ".join(str(s) for s in manifest.get("seeds", [])) or "?"
    dataset = str(manifest.get("dataset", "?"))
    lines += [f"- Command: `{command}`{made}",
              f"- Started {manifest.get('started', '?')}, finished "
              f"{manifest.get('finished', '?')}",
              f"- Elapsed: {duration(manifest.get('elapsed_seconds', 0.0))} over "
              f"{manifest.get('cells', '?')} cells",
              f"- Dataset: {dataset_label(dataset)} (`{dataset}`); seeds: {seeds}",
              f"- Report written {dt.datetime.now().isoformat(timespec='seconds')}", ""]
    if manifest.get("quick"):
        lines += ["> **Quick run**: shortened settings. These numbers check the pipeline, they "
                  "are not a reproduction of the papers.", ""]
    return "\n".join(lines)


def protocol(manifest: dict, chosen: dict, results: Results) -> str:
    lines = ["## Protocol", ""]
    if not manifest.get("protocol"):
        lines.append("- _manifest.json has no protocol: split, filtering and ranking unknown._")
    for key, text in manifest.get("protocol", {}).items():
        lines.append(f"- **{key}**: {text}")
    tuning = manifest.get("tuning_plans", [])
    reported = manifest.get("reported_plans", [])
    if tuning or reported:
        overlap = sorted(set(tuning) & set(reported))
        lines.append(f"- **plans**: tuned on {', '.join(tuning) or DASH}; reported on "
                     f"{', '.join(reported) or DASH} "
                     + (f"(**overlap: {', '.join(overlap)}**)" if overlap else "(disjoint)"))
    if chosen:
        lines.append(f"- **criterion**: {chosen.get('criterion', DASH)}; budget "
                     f"{chosen.get('budget', DASH)} settings per method")
    lines.append("")
    fedshare = chosen.get("learning", {}).get("fedshare", {})
    if fedshare:
        lines += [f"Temperature and lambda1 chosen on validation (Sec. V-D): tau = "
                  f"{fedshare.get('tau', DASH)}, lambda1 = {fedshare.get('lambda1', DASH)}.", ""]
    rows = [[phase, label(method), key, json.dumps(value) if isinstance(value, dict | list)
             else str(value)]
            for phase in ("learning", "unlearning")
            for method, settings in chosen.get(phase, {}).items()
            for key, value in settings.items()]
    if rows:
        lines += ["Chosen settings (`chosen.json`):", "",
                  table(["Phase", "Method", "Setting", "Value"], rows)]
    else:
        lines += ["_chosen.json absent: the chosen settings are unknown._", ""]
    if "tuning" in results:
        t = results["tuning"]
        summary = t.groupby(["stage", "method"], sort=False).agg(
            tried=("settings", "nunique"), plans=("plan", "nunique"), best=("score", "max"))
        lines += ["Tuning (`tuning.csv`):", "",
                  table(["Stage", "Method", "Settings tried", "Plans", "Best score"],
                        [[s, label(m), int(r.tried), int(r.plans), number(r.best)]
                         for (s, m), r in summary.iterrows()])]
    return "\n".join(lines)


# -------------------------------------------------------------------------- Tables III, IV


def score_table(results: Results, name: str, paper: PaperValues, table_no: str, phase: str,
                methods: Sequence[str], extra: Sequence[str]) -> str:
    """Ours (mean ± std over seeds) beside the paper's, HR@20 and NDCG@20."""
    data = results.get(name)
    stats = mean_std(data, "method", SCORES) if data is not None else None
    _, source = paper.source(table_no)
    header = ["Method", "HR@20 ours", f"HR@20 {source}", "NDCG@20 ours", f"NDCG@20 {source}"]
    rows = []
    for method in methods:
        rows.append([label(method), ms(stats, method, "test_hr@20"),
                     number(paper.value(table_no, method, "hr@20", phase)),
                     ms(stats, method, "test_ndcg@20"),
                     number(paper.value(table_no, method, "ndcg@20", phase))])
    for method in extra:
        if stats is not None and method in stats.index:
            rows.append([f"{label(method)} (ours only)", ms(stats, method, "test_hr@20"),
                         NOT_IN_PAPER, ms(stats, method, "test_ndcg@20"), NOT_IN_PAPER])
    note = (f"_{name}.csv absent: not run._\n\n" if data is None else
            f"Ours: mean ± std over {data['seed'].nunique()} seeds, full ranking over every "
            "item not in the user's training data, all test users.\n\n")
    return note + table(header, rows)


def table3(folder: Path, results: Results, paper: PaperValues) -> str:
    bars = (figure(folder, "table3_bars.png", "Table III as bars")
            if "learning" in results or "unlearning" in results else "")
    return "\n".join([
        "## Table III: recommendation accuracy", "", "### Learning phase", "",
        score_table(results, "learning", paper, "3", "learning", LEARNING_TABLE3,
                    ["no-sharing"]),
        "### After unlearning", "",
        score_table(results, "unlearning", paper, "3", "unlearning", UNLEARNING_TABLE3,
                    ["no-unlearning"]),
        bars, forgetting(results)])


def forgetting(results: Results) -> str:
    if "unlearning" not in results:
        return ""
    data = results["unlearning"]
    columns = ["forgotten_hr@20", "mia_auc", "top20_jaccard"]
    stats = mean_std(data, "method", columns)
    rows = [[label(m), *(ms(stats, m, c) for c in columns)]
            for m in ordered(stats.index, ("no-unlearning", *UNLEARNING_FIG4))]
    return "\n".join([
        "How much was forgotten (ours only; the paper reports none), over the unsharing users "
        "who still hold data:", "",
        table(["Method", "forgotten HR@20 (lower = forgotten)", "MIA AUC (0.5 = forgotten)",
               "top-20 Jaccard with Retrain"], rows)])


def table4(results: Results, paper: PaperValues) -> str:
    return "\n".join([
        "## Table IV: ablations", "", "### Learning phase", "",
        score_table(results, "learning", paper, "4", "learning", LEARNING_ABLATIONS, []),
        "### After unlearning", "",
        score_table(results, "unlearning", paper, "4", "unlearning", UNLEARNING_ABLATIONS, [])])


# ----------------------------------------------------------------------------- Fig. 4, 5


def ratio(stats: pd.DataFrame, column: str, a: str, b: str) -> str:
    if a not in stats.index or b not in stats.index or stats.loc[b, column] == 0:
        return DASH
    return f"{stats.loc[a, column] / stats.loc[b, column]:.3f}"


def fig4(folder: Path, results: Results) -> str:
    lines = ["## Fig. 4: unlearning time and storage", ""]
    if "unlearning" not in results:
        return "\n".join([*lines, "_unlearning.csv absent: not run._", ""])
    columns = ["seconds", "kept_bytes", "client_bytes", "server_bytes", "bytes_down",
               "bytes_up"]
    stats = mean_std(results["unlearning"], "method", columns)
    methods = [m for m in ordered(stats.index, UNLEARNING_FIG4) if m != "no-unlearning"]
    rows = [[label(m), ms(stats, m, "seconds", 1),
             *(ms(stats, m, c, 3, MIB) for c in columns[1:])] for m in methods]
    lines += [table(["Method", "seconds", "MiB kept", "MiB kept on clients", "MiB kept on server",
                     "MiB down", "MiB up"], rows),
              f"- FedShare / Retrain time: {ratio(stats, 'seconds', 'fedshare', 'retrain')}",
              f"- FedShare / FRU storage: {ratio(stats, 'kept_bytes', 'fedshare', 'fru')}",
              f"- FedShare / CUFRU storage: {ratio(stats, 'kept_bytes', 'fedshare', 'cufru')}",
              "- Seconds are in-process compute; Retrain keeps nothing (it relearns from the "
              "remaining data).", "",
              figure(folder, "fig4_time_storage.png", "Fig. 4: unlearning time and storage")]
    return "\n".join(lines)


def pivot(data: pd.DataFrame, x: str, methods: Sequence[str], column: str = "test_hr@20",
          order: pd.Index | None = None) -> tuple[list[str], list[list[str]]]:
    """Rows: x values; columns: methods; cells: mean ± std of ``column``."""
    stats = mean_std(data, [x, "method"], [column])
    xs = order if order is not None else sorted(data[x].unique())
    rows = [[str(v), *(ms(stats, (v, m), column) for m in methods)] for v in xs]
    return [label(m) for m in methods], rows


def fig5(folder: Path, results: Results) -> str:
    lines = ["## Fig. 5: sensitivity (test HR@20, mean ± std over seeds)", ""]
    if "sweep_users" in results:
        d = results["sweep_users"]
        order = d.groupby("groups")["shared_fraction"].mean().sort_values()
        methods = ordered(d["method"].unique(), ("fedshare", "fedshare-fedavg", "cdcgnnfed",
                                                 "pdc-frs"))
        names, rows = pivot(d, "groups", methods, order=order.index)
        rows = [[f"{r[0]} ({order[r[0]]:.1%} shared)", *r[1:]] for r in rows]
        lines += ["### (a) user-type ratio (full : partial : none)", "",
                  table(["Groups", *names], rows)]
    else:
        lines += ["### (a) user-type ratio", "", "_sweep_users.csv absent: not run._", ""]
    lines += one_line_sweep(results, "sweep_lambda", "lambda1", "(b) contrastive weight lambda1",
                            [("test_hr@20", "HR@20", 4, 1.0), ("test_ndcg@20", "NDCG@20", 4, 1.0),
                             ("valid_ndcg@20", "valid NDCG@20", 4, 1.0)])
    lines += one_line_sweep(results, "sweep_snapshots", "snapshots",
                            "(c) number of snapshots M",
                            [("test_hr@20", "HR@20", 4, 1.0), ("kept_bytes", "MiB kept", 3, MIB),
                             ("seconds", "seconds", 1, 1.0),
                             ("forgotten_hr@20", "forgotten HR@20", 4, 1.0)])
    if "sweep_gamma" in results:
        d = results["sweep_gamma"]
        methods = ordered(d["method"].unique(), ("fedshare", "fru", "cufru", "retrain"))
        names, rows = pivot(d, "gamma", methods)
        lines += ["### (d) unlearning ratio gamma", "", table(["gamma", *names], rows)]
    else:
        lines += ["### (d) unlearning ratio gamma", "", "_sweep_gamma.csv absent: not run._", ""]
    if any(n in results for n in ("sweep_users", "sweep_lambda", "sweep_snapshots",
                                  "sweep_gamma")):
        lines.append(figure(folder, "fig5_sweeps.png", "Fig. 5: sensitivity sweeps"))
    return "\n".join(lines)


def one_line_sweep(results: Results, name: str, x: str, title: str,
                   columns: list[tuple[str, str, int, float]]) -> list[str]:
    """A FedShare-only sweep: one row per x, the listed columns (name, header, digits, scale)."""
    if name not in results:
        return [f"### {title}", "", f"_{name}.csv absent: not run._", ""]
    stats = mean_std(results[name], x, [c for c, *_ in columns]).sort_index()
    rows = [[str(v), *(ms(stats, v, c, digits, scale) for c, _, digits, scale in columns)]
            for v in stats.index]
    return [f"### {title}", "", table([x, *(h for _, h, *_ in columns)], rows)]


def curves(folder: Path, results: Results) -> str:
    lines = ["## Learning curves", ""]
    if "curves" not in results:
        return "\n".join([*lines, "_curves.csv absent: not run._", ""])
    return "\n".join([*lines, "Validation HR@20 and NDCG@20 every 10 rounds (mean over seeds, "
                      "band: min-max).", "",
                      figure(folder, "learning_curves.png", "Learning curves")])


# ---------------------------------------------------------------------------------- claims


def claims_section(results: Results, claims: list[Mapping], checks: dict[str, Check]) -> str:
    """One row per claim: the paper's words, our verdict and the numbers behind it."""
    lines = ["## Claims", "",
             "A claim holds only if the ordering is the claimed one and the gap exceeds the "
             "larger std over seeds; a smaller gap is *not resolved (within noise)*.", ""]
    rows = []
    for claim in claims:
        cid = str(claim.get("id", "?"))
        check = checks.get(cid)
        verdict, evidence = (check(results) if check else
                             (NOT_RUN, "no automatic check for this claim"))
        paper = PAPERS.get(str(claim.get("paper", "")).lower(), claim.get("paper", ""))
        rows.append([cid, f"{paper} {claim.get('where', '')}".strip(),
                     claim.get("text", ""), verdict, evidence])
    lines.append(table(["Claim", "Where", "Paper says", "Verdict", "Evidence"], rows)
                 if rows else "_No claims loaded._\n")
    orphans = sorted(set(checks) - {str(c.get("id")) for c in claims})
    if orphans and claims:
        lines.append(f"Checks with no claim of that id in the paper numbers: "
                     f"{', '.join(orphans)}.\n")
    return "\n".join(lines)
