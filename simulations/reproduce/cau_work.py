"""The CAU cells of ``fedshare reproduce``: one Original per (backbone, seed), then one cell per
method on it, so that the methods of one Original run on both cores.

The Original is trained once and saved in the results folder (``models/``,
:func:`simulations.cau_table.original`); each method cell loads it and runs the method with
:func:`fedshare.sequences.unlearning_methods.run_case`, exactly as ``fedshare cau-table`` does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedshare.sequences.config import SequenceConfig
from fedshare.sequences.data import prepare_sequences
from fedshare.sequences.requests import sequence_requests
from fedshare.sequences.unlearning_methods import (
    LEARNING,
    CAUSettings,
    UnlearningCase,
    run_case,
)
from simulations.cau_table import TableSettings, original


def table_settings(dataset: str, data_path: str | None, fed: Mapping[str, Any],
                   cau: Mapping[str, Any]) -> TableSettings:
    return TableSettings(dataset, data_path, fed=dataclasses.replace(LEARNING, **fed),
                         cau=CAUSettings(**cau))


def _case(folder: str, backbone: str, seed: int, settings: TableSettings) -> UnlearningCase:
    data = prepare_sequences(settings.dataset, settings.data_path, max_len=settings.max_len,
                             split_seed=seed)
    fed: SequenceConfig = dataclasses.replace(settings.fed, backbone=backbone)
    model = original(Path(folder), data, fed, seed, lambda line: None)
    return UnlearningCase(data, sequence_requests(data, settings.request_fraction, seed), model,
                          fed, settings.cau, seed)


def cau_original(folder: str, backbone: str, seed: int, dataset: str, data_path: str | None,
                 fed: Mapping[str, Any], cau: Mapping[str, Any]) -> dict:
    """Train and keep the Original of (backbone, seed)."""
    torch.set_num_threads(1)
    case = _case(folder, backbone, seed, table_settings(dataset, data_path, fed, cau))
    return {"backbone": backbone, "seed": seed, "best_round": case.original.best_round,
            "test": {k: float(v) for k, v in case.original.test.items()}}


def cau_method(folder: str, backbone: str, seed: int, method: str, dataset: str,
               data_path: str | None, fed: Mapping[str, Any], cau: Mapping[str, Any]) -> dict:
    """One method on the kept Original: the row ``fedshare cau-table`` writes."""
    torch.set_num_threads(1)
    case = _case(folder, backbone, seed, table_settings(dataset, data_path, fed, cau))
    (row,) = run_case(case, (method,))
    return {"backbone": backbone, "seed": seed, **{k: _plain(v) for k, v in row.items()}}


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return value
