"""The two papers' published numbers, typed once, for setting this project's numbers beside them.

FedShare (Tables III-IV) and CAU (Tables 1-4) are copied verbatim, typos included, into
``simulations/paper_numbers.toml``; every report reads them from there, so a number is typed (and
checked against the paper) in one place only. The file is long format, one entry per printed cell,
keyed by (paper, table, phase, method, dataset, backbone, metric) in this project's own names
(methods such as ``fedshare-fedavg`` or ``cau-embedding-soft``, datasets such as ``video-games``,
metrics such as ``hr@20``), with ``row`` keeping the label as printed; it also lists the papers'
claims. A malformed file raises :class:`FedShareError` naming the offending entry.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pandas as pd

from fedshare.errors import FedShareError

PAPER_NUMBERS = Path(__file__).resolve().parents[1] / "paper_numbers.toml"
COLUMNS = ("paper", "table", "row", "phase", "method", "dataset", "backbone", "metric", "value",
           "note")
KEY = ("paper", "table", "phase", "method", "dataset", "backbone", "metric")
ALLOWED = {
    "paper": {"fedshare", "cau"},
    "dataset": {"ml-1m", "fashion", "video-games", "beauty"},
    "metric": {"hr@20", "ndcg@20", "ndcg@10", "recall@10", "recall@20", "hit_u@1", "hit_u@5",
               "u_score", "minutes"},
    "phase": {"", "learning", "unlearning"},
    "backbone": {"", "gru4rec", "sasrec", "bert4rec"},
}
TABLES = {"fedshare": {"III", "IV"}, "cau": {"1", "2", "3", "4"}}
CLAIM_FIELDS = ("id", "paper", "where", "text")


def _read(path: str | Path, section: str) -> list[dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise FedShareError(f"paper numbers {path}: {e}") from None
    entries = data.get(section, [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise FedShareError(f"paper numbers {path}: '{section}' must be a list of tables")
    return entries


def _check_number(i: int, entry: dict[str, Any]) -> dict[str, Any]:
    where = f"number #{i + 1} ({', '.join(str(entry.get(k, '?')) for k in KEY)})"
    missing = [k for k in COLUMNS[:-1] if k not in entry]
    unknown = sorted(set(entry) - set(COLUMNS))
    if missing or unknown:
        raise FedShareError(f"paper {where}: missing {missing}, unknown {unknown}")
    if not all(isinstance(v, str) for k, v in entry.items() if k != "value"):
        raise FedShareError(f"paper {where}: every field but value must be a string")
    if not isinstance(entry["value"], float):
        raise FedShareError(f"paper {where}: value {entry['value']!r} is not a float")
    for field, allowed in ALLOWED.items():
        if entry[field] not in allowed:
            raise FedShareError(f"paper {where}: {field} {entry[field]!r} not in {sorted(allowed)}")
    if entry["table"] not in TABLES[entry["paper"]]:
        raise FedShareError(f"paper {where}: no table {entry['table']!r} in {entry['paper']}")
    return {"note": "", **entry}


def load_paper_numbers(path: str | Path = PAPER_NUMBERS) -> pd.DataFrame:
    """Every printed cell, one row each; columns exactly ``COLUMNS``."""
    rows = [_check_number(i, e) for i, e in enumerate(_read(path, "number"))]
    numbers = pd.DataFrame(rows, columns=list(COLUMNS))
    twice = numbers[numbers.duplicated(list(KEY), keep=False)]
    if len(twice):
        first = twice.iloc[0]
        raise FedShareError(f"paper numbers {path}: {len(twice)} entries share the key "
                            f"{', '.join(str(first[k]) for k in KEY)}")
    return numbers


def load_claims(path: str | Path = PAPER_NUMBERS) -> list[dict[str, str]]:
    """The papers' claims: dicts with keys id, paper, where, text; ids unique."""
    claims: list[dict[str, str]] = []
    for i, entry in enumerate(_read(path, "claim")):
        name = f"claim #{i + 1} ({entry.get('id', '?')})"
        if sorted(entry) != sorted(CLAIM_FIELDS) or not all(
                isinstance(v, str) and v for v in entry.values()):
            raise FedShareError(f"paper {name}: needs exactly the non-empty strings "
                                f"{', '.join(CLAIM_FIELDS)}")
        if entry["paper"] not in ALLOWED["paper"]:
            raise FedShareError(f"paper {name}: paper {entry['paper']!r} unknown")
        if any(c["id"] == entry["id"] for c in claims):
            raise FedShareError(f"paper {name}: id given twice")
        claims.append({k: entry[k] for k in CLAIM_FIELDS})
    return claims


def paper_value(numbers: pd.DataFrame, *, paper: str, table: str, method: str, dataset: str,
                metric: str, phase: str = "", backbone: str = "") -> float | None:
    """The printed value of one cell, or None where the paper prints none."""
    key = {"paper": paper, "table": table, "phase": phase, "method": method, "dataset": dataset,
           "backbone": backbone, "metric": metric}
    hit = numbers.loc[(numbers[list(key)] == pd.Series(key)).all(axis=1), "value"]
    if len(hit) > 1:
        raise FedShareError(f"paper numbers: {len(hit)} values for {key}")
    return float(hit.iloc[0]) if len(hit) else None
