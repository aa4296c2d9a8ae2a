"""``fedshare privacy-audit``: what the server can read of local interactions, per deployment and
defence, and what each defence costs (issue 20).

For each seed (split, plan and run seed together) and setting of :data:`SETTINGS` it trains the
learning phase with the setting's defence (once per :func:`training_key`), attacks what the
server receives (:mod:`fedshare.privacy.audit`) and scores the final table. Writes, in one
folder:

- ``privacy_scores.csv``: one row per seed, setting, audited user and attack;
- ``privacy_table.csv`` / ``.md``: per setting and attack, the AUC against popularity-matched
  negatives, precision@|local| and the catalogue AUC, averaged over the audited users (users
  with local data, uniform) and seeds, the strongest attack of each setting marked;
- ``utility.csv``: per setting, test HR@20 / NDCG@20 against the undefended run, clients'
  seconds per round, bytes per round each way, and epsilon for LDP;
- ``summary.json``: the settings and the issue's target checked for the default defence;
- ``privacy_utility.png``: strongest attack AUC against test HR@20 per setting.

Resumable: each finished (seed, setting) cell is kept in ``cells/``; ``--resume FOLDER`` skips
them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from fedshare.atomic import write_atomically, write_json
from fedshare.data.prepared import PreparedData
from fedshare.defences import UploadDefence, parse_defences
from fedshare.errors import FedShareError
from fedshare.federated.config import FederatedConfig
from fedshare.federated.traffic import table_bytes, update_bytes
from fedshare.privacy.audit import AuditSetting, audit_setting, record_run, training_key
from fedshare.runconfig import DEFAULT_DEFENCE, data_key, load_data
from simulations.experiment import new_folder

UNDEFENDED = "device"


@dataclass(frozen=True)
class SettingSpec:
    defence: str
    group: int = 1
    decoy_rows: int = 0
    ldp_noise: float = 1.0
    ldp_clip: float = 1.0
    note: str = ""


SETTINGS: dict[str, SettingSpec] = {
    "device": SettingSpec("none", 1, note="one user per device, no defence"),
    "cohort-10": SettingSpec("none", 10, note="a cohort node's reply: 10 users summed"),
    "secagg": SettingSpec("secagg", 0, note="secure sum of the round; server picks who trains"),
    "secagg+hidden": SettingSpec("secagg+hidden", 0,
                                 note="secure sum; devices pick themselves (default)"),
    "non-marking": SettingSpec("non-marking", 1, note="full table, Gaussian decoy deltas"),
    "non-marking-256": SettingSpec("non-marking", 1, decoy_rows=256,
                                   note="256 rows, Gaussian decoy deltas"),
    "ldp-0.03": SettingSpec("ldp", 1, ldp_noise=0.03, note="clip 1, noise std 0.06"),
    "ldp-0.1": SettingSpec("ldp", 1, ldp_noise=0.1, note="clip 1, noise std 0.2"),
    "ldp-1": SettingSpec("ldp", 1, ldp_noise=1.0, note="clip 1, noise std 2"),
}


def _spec(name: str) -> SettingSpec | None:
    """A named setting, or ``cohort-K`` for any cohort size K >= 2."""
    if name in SETTINGS:
        return SETTINGS[name]
    size = name.removeprefix("cohort-")
    if name.startswith("cohort-") and size.isdigit() and int(size) >= 2:
        return SettingSpec("none", int(size), note=f"a cohort node's reply: {size} users summed")
    return None


def check_settings(names: Sequence[str]) -> tuple[str, ...]:
    unknown = [n for n in names if _spec(n) is None]
    if unknown:
        raise FedShareError(f"unknown setting {unknown[0]!r}; choose from "
                            f"{', '.join(SETTINGS)} or cohort-K (K >= 2)")
    if not names:
        raise FedShareError("no settings to audit")
    return tuple(names)


def audit_settings(name: str) -> AuditSetting:
    spec = _spec(name)
    assert spec is not None
    return AuditSetting(name, UploadDefence(parse_defences(spec.defence), spec.decoy_rows,
                                            spec.ldp_clip, spec.ldp_noise), spec.group)


def wire_bytes(setting: AuditSetting, devices: float, num_items: int, dim: int
               ) -> tuple[float, float]:
    """Bytes per round down and up over all devices that answer, by the protocol's encodings
    (:mod:`fedshare.federated.traffic`); a secure sum's upload is the masked int64 vector of
    :mod:`fedshare.secure_sum` (``items x dim + items + 2`` entries). The SecAgg+ key and
    share messages (a few hundred bytes per neighbour) are left out here; the Flower run
    counts them (see docs/privacy.md)."""
    down = devices * table_bytes(num_items, dim)
    if setting.defence.secure:
        return down, devices * 8 * (num_items * dim + num_items + 2)
    return down, devices * update_bytes(num_items, dim)


def _cell(data: PreparedData, config: FederatedConfig, names: Sequence[str], users: int,
          seed: int, folder: Path, progress: Callable[[str], None], started: float,
          done: list[int], total: int) -> None:
    runs: dict[tuple, object] = {}
    for name in names:
        path = folder / "cells" / f"{seed}-{name}.json"
        if path.exists():
            done[0] += 1
            continue
        setting = audit_settings(name)
        key = training_key(setting.defence)
        if key not in runs:
            runs[key] = record_run(data, config, setting.defence)
        run = runs[key]
        result = audit_setting(data, config, setting, users, seed, run)  # type: ignore[arg-type]
        trainers = len(run.federation.candidates)  # type: ignore[attr-defined]
        devices = trainers if setting.defence.hidden else config.fraction * trainers
        down, up = wire_bytes(setting, devices, data.num_items, config.dim)
        utility = {**result.utility, "bytes-down-per-round": down, "bytes-up-per-round": up}
        write_json(path, {"seed": seed, "setting": name, "utility": utility,
                          "scores": result.scores.to_dict(orient="list")})
        done[0] += 1
        elapsed = time.time() - started
        progress(f"[{done[0]}/{total}] seed {seed} {name}: strongest AUC "
                 f"{result.scores.groupby('attack')['auc'].mean().max():.3f}, test HR@20 "
                 f"{utility['test-hr@20']:.4f} ({elapsed:.0f} s elapsed, about "
                 f"{elapsed / max(done[0], 1) * (total - done[0]):.0f} s left)")


def privacy_audit(config: FederatedConfig, run: dict, seeds: Sequence[int], names: Sequence[str],
                  users: int, out: str | Path, resume: str | Path | None = None,
                  progress: Callable[[str], None] = print) -> tuple[Path, dict]:
    """Run every cell, then write the outputs (see module docstring)."""
    names = check_settings(names)
    if users < 1:
        raise FedShareError(f"--users must be >= 1, got {users}")
    settings = {"seeds": list(seeds), "settings": list(names), "users": users,
                "config": config.to_dict(), "data": {k: run.get(k) for k in ("dataset",
                                                                             "data-path")}}
    for seed in seeds:  # bad data fail here, before any folder
        load_data(data_key({**run, "split-seed": seed, "plan-seed": seed}, {}))
    if resume is not None:
        folder = Path(resume)
        kept = folder / "settings.json"
        if not kept.exists():
            raise FedShareError(f"{folder} is not a privacy-audit folder")
        if json.loads(kept.read_text()) != settings:
            raise FedShareError(f"{folder} was made with other settings; start a new folder")
    else:
        folder = new_folder(out, "privacy-audit")
        write_json(folder / "settings.json", settings)
    started, done, total = time.time(), [0], len(seeds) * len(names)
    for seed in seeds:
        seeded = {**run, "split-seed": seed, "plan-seed": seed}
        data = load_data(data_key(seeded, {}))
        _cell(data, replace(config, seed=seed), names, users, seed, folder, progress,
              started, done, total)
    return folder, report(folder, names)


def load_cells(folder: Path, names: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    scores, utility = [], []
    for path in sorted((folder / "cells").glob("*.json")):
        cell = json.loads(path.read_text())
        if cell["setting"] not in names:
            continue
        frame = pd.DataFrame(cell["scores"])
        frame.insert(0, "setting", cell["setting"])
        frame.insert(0, "seed", cell["seed"])
        scores.append(frame)
        utility.append({"seed": cell["seed"], "setting": cell["setting"], **cell["utility"]})
    return pd.concat(scores, ignore_index=True), pd.DataFrame(utility)


def summarise(scores: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """Per setting and attack: means over audited users and seeds; ``strongest`` marks the
    attack with the highest AUC of each setting."""
    table = scores.groupby(["setting", "attack"])[["auc", "precision", "catalogue-auc"]].mean()
    table["users"] = scores.groupby(["setting", "attack"])["user"].count()
    table = table.reset_index()
    table["strongest"] = table["auc"] == table.groupby("setting")["auc"].transform("max")
    table["setting"] = pd.Categorical(table["setting"], list(names), ordered=True)
    return table.sort_values(["setting", "auc"], ascending=[True, False])


def utility_table(utility: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    means = utility.groupby("setting").mean(numeric_only=True).drop(columns="seed")
    means["seeds"] = utility.groupby("setting")["seed"].nunique()
    if UNDEFENDED in means.index:
        base = utility[utility["setting"] == UNDEFENDED].set_index("seed")
        ratios = utility.set_index("seed").join(base[["test-hr@20", "test-ndcg@20"]],
                                                rsuffix="-undefended")
        ratios["hr-ratio"] = ratios["test-hr@20"] / ratios["test-hr@20-undefended"]
        ratios["ndcg-ratio"] = ratios["test-ndcg@20"] / ratios["test-ndcg@20-undefended"]
        means = means.join(ratios.groupby("setting")[["hr-ratio", "ndcg-ratio"]].mean())
    return means.reindex([n for n in names if n in means.index])


def report(folder: Path, names: Sequence[str]) -> dict:
    scores, utility = load_cells(folder, names)
    write_atomically(folder / "privacy_scores.csv",
                     lambda fh: scores.to_csv(fh, index=False), "w")
    table = summarise(scores, names)
    write_atomically(folder / "privacy_table.csv", lambda fh: table.to_csv(fh, index=False), "w")
    utilities = utility_table(utility, names)
    write_atomically(folder / "utility.csv", lambda fh: utilities.to_csv(fh), "w")
    strongest = table[table["strongest"]].drop_duplicates("setting").set_index("setting")
    summary = {"settings": {n: {**vars(_spec(n))} for n in names},
               "strongest": {str(s): {"attack": row["attack"], "auc": row["auc"],
                                      "precision": row["precision"]}
                             for s, row in strongest.iterrows()},
               "utility": json.loads(utilities.to_json(orient="index")),
               "targets": targets(strongest, utilities)}
    write_json(folder / "summary.json", summary)
    write_atomically(folder / "privacy_table.md",
                     lambda fh: fh.write(to_markdown(table, utilities)), "w")
    variant = json.loads((folder / "settings.json").read_text())["config"]["variant"]
    plot(strongest, utilities, folder / "privacy_utility.png", variant)
    return summary


def targets(strongest: pd.DataFrame, utilities: pd.DataFrame) -> dict:
    """The issue's target for the default defence: strongest AUC <= 0.6, HR@20 >= 97%."""
    if DEFAULT_DEFENCE not in strongest.index or "hr-ratio" not in utilities:
        return {"checked": False, "why": f"needs the {DEFAULT_DEFENCE} and {UNDEFENDED} "
                                         "settings"}
    auc = float(strongest.loc[DEFAULT_DEFENCE, "auc"])
    ratio = float(utilities.loc[DEFAULT_DEFENCE, "hr-ratio"])
    return {"checked": True, "default": DEFAULT_DEFENCE, "strongest-auc": auc,
            "auc-met": auc <= 0.6, "hr-ratio": ratio, "hr-met": ratio >= 0.97,
            "seeds": int(utilities.loc[DEFAULT_DEFENCE, "seeds"])}


def to_markdown(table: pd.DataFrame, utilities: pd.DataFrame) -> str:
    lines = ["| setting | attack | AUC (matched) | precision@|L| | catalogue AUC | users |",
             "|---|---|---|---|---|---|"]
    for _, row in table.iterrows():
        mark = "**" if row["strongest"] else ""
        lines.append(f"| {row['setting']} | {mark}{row['attack']}{mark} | "
                     f"{mark}{row['auc']:.3f}{mark} | {row['precision']:.3f} | "
                     f"{row['catalogue-auc']:.3f} | {int(row['users'])} |")
    lines += ["", "| setting | seeds | test HR@20 | HR ratio | test NDCG@20 | NDCG ratio | "
              "client s/round | MB down/round | MB up/round | epsilon (mean) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in utilities.iterrows():
        eps = row.get("epsilon-mean", float("nan"))
        lines.append(f"| {name} | {int(row['seeds'])} | {row['test-hr@20']:.4f} | "
                     f"{row.get('hr-ratio', float('nan')):.3f} | {row['test-ndcg@20']:.4f} | "
                     f"{row.get('ndcg-ratio', float('nan')):.3f} | "
                     f"{row['client-seconds-per-round']:.3f} | "
                     f"{row['bytes-down-per-round'] / 1e6:.1f} | "
                     f"{row['bytes-up-per-round'] / 1e6:.1f} | "
                     f"{'-' if np.isnan(eps) else f'{eps:.0f}'} |")
    return "\n".join(lines) + "\n"


def plot(strongest: pd.DataFrame, utilities: pd.DataFrame, path: Path, variant: str = ""
         ) -> Path:
    """Left: strongest attack AUC against test HR@20, one marker per setting. Right: the same
    two figures as bars per setting (HR@20 as a share of the undefended run's), so settings
    whose markers coincide on the left stay apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in utilities.index if n in strongest.index]
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(13, 5.2),
                                   gridspec_kw={"width_ratios": [1.25, 1]})
    markers = "osD^vP*Xh<>"
    for k, name in enumerate(names):
        ax.scatter(strongest.loc[name, "auc"], utilities.loc[name, "test-hr@20"], s=70,
                   marker=markers[k % len(markers)], color=f"C{k}",
                   label=f"{name} ({strongest.loc[name, 'attack']})")
    if UNDEFENDED in utilities.index:
        ax.axhline(0.97 * utilities.loc[UNDEFENDED, "test-hr@20"], color="grey",
                   linestyle="-.", linewidth=1, label="97% of the undefended HR@20")
    ax.axvline(0.6, color="grey", linestyle="--", linewidth=1, label="AUC 0.6")
    ax.axvline(0.5, color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xlabel("strongest attack's AUC (local items vs popularity-matched negatives)")
    ax.set_ylabel("test HR@20")
    ax.set_title(f"Privacy against utility, {variant} (mean over seeds)")
    ax.legend(fontsize=7, loc="best")
    y = np.arange(len(names))
    auc = [strongest.loc[n, "auc"] for n in names]
    ratio = [utilities.loc[n, "hr-ratio"] if "hr-ratio" in utilities else np.nan
             for n in names]
    bars.barh(y - 0.2, auc, height=0.4, color="C3", label="strongest attack AUC")
    bars.barh(y + 0.2, ratio, height=0.4, color="C0", label="HR@20 / undefended")
    bars.axvline(0.6, color="C3", linestyle="--", linewidth=1)
    bars.axvline(0.97, color="C0", linestyle="-.", linewidth=1)
    bars.set_yticks(y, names, fontsize=8)
    bars.invert_yaxis()
    bars.set_xlim(0, 1.1)
    bars.set_title("Per setting (lines: AUC 0.6, 97% HR@20)")
    bars.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
