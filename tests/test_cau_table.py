"""``fedshare cau-table``: every cell, the outputs, resuming (issue 17). Tiny settings."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from synthetic import toy_sessions

from fedshare.errors import FedShareError
from fedshare.sequences.config import SequenceConfig
from fedshare.sequences.unlearning_methods import METHODS, CAUSettings
from simulations import cau_table as table

torch.set_num_threads(1)

SETTINGS = table.TableSettings(
    "toy", request_fraction=0.2,
    fed=SequenceConfig(rounds=2, fraction=0.5, eval_every=1, dim=8, local_epochs=1, lr=0.5,
                       server_lr=0.05),
    cau=CAUSettings(epochs=1, batch_size=4, continued_rounds=1))


def _fill(folder, lines, methods=METHODS):
    datas = {0: toy_sessions(50, seed=0)}
    return table.fill(folder, ("sasrec", "gru4rec"), (0,), SETTINGS, tuple(methods), datas,
                      lines.append)


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cau")
    lines: list[str] = []
    _fill(folder, lines)
    return folder, lines


def test_every_cell_and_output_is_written(filled):
    folder, lines = filled
    frame = pd.read_csv(folder / "cau_table.csv")
    assert len(frame) == 2 * len(METHODS)
    assert set(frame["backbone"]) == {"sasrec", "gru4rec"}
    assert list(frame[frame.backbone == "sasrec"]["method"]) == list(METHODS)
    markdown = (folder / "cau_table.md").read_text()
    assert markdown.count("\n| sasrec |") == len(METHODS)
    summary = json.loads((folder / "summary.json").read_text())
    assert set(summary["means"]) == {"sasrec", "gru4rec"}
    checks = summary["targets"]["sasrec"]
    assert set(checks) == {*table.CAU_VARIANTS, "ga_collapses"}
    assert (folder / "cau_plane.png").stat().st_size > 10_000
    progress = [line for line in lines if line.startswith("[")]
    assert len(progress) == 2 * len(METHODS)
    assert progress[-1].startswith(f"[{2 * len(METHODS)}/{2 * len(METHODS)} cells")


def test_targets_follow_their_definitions(filled):
    folder, _ = filled
    summary = json.loads((folder / "summary.json").read_text())
    means = summary["means"]["gru4rec"]
    for variant in table.CAU_VARIANTS:
        check = summary["targets"]["gru4rec"][variant]
        row = means[variant]
        assert check["hit_u1_at_most_retrain"] == (row["hit_u@1"] <= means["retrain"]["hit_u@1"])
        assert check["recall_kept"] == pytest.approx(row["recall@10"]
                                                     / means["original"]["recall@10"])
        assert check["u_above_every_ablation"] == all(
            row["u_score"] > means[a]["u_score"] for a in table.ABLATIONS)


def test_a_resumed_table_recomputes_nothing_finished(filled, tmp_path):
    folder, _ = filled
    before = {p.name: p.read_text() for p in (folder / "cells").iterdir()}
    lines: list[str] = []
    _fill(folder, lines)
    assert not lines  # no Original trained, no cell computed
    assert {p.name: p.read_text() for p in (folder / "cells").iterdir()} == before


def test_a_stopped_table_finishes_only_what_is_missing(filled, tmp_path):
    folder, _ = filled
    copy = tmp_path / "copy"
    (copy / "cells").mkdir(parents=True)
    (copy / "models").mkdir()
    for path in (folder / "models").iterdir():
        (copy / "models" / path.name).write_bytes(path.read_bytes())
    for path in (folder / "cells").iterdir():
        if "retrain" not in path.name:
            (copy / "cells" / path.name).write_text(path.read_text())
    lines: list[str] = []
    _fill(copy, lines)
    assert len(lines) == 2 and all("retrain" in line for line in lines)
    assert "training the Original" not in " ".join(lines)
    again = pd.read_csv(copy / "cau_table.csv").set_index(["backbone", "method"])
    first = pd.read_csv(folder / "cau_table.csv").set_index(["backbone", "method"])
    pd.testing.assert_series_equal(again["recall@10"], first["recall@10"])


def test_resuming_with_other_settings_is_refused(tmp_path):
    folder = table.open_folder(tmp_path, None, SETTINGS)
    other = table.TableSettings("toy", cau=CAUSettings(batch_size=8))
    with pytest.raises(FedShareError, match="other settings"):
        table.open_folder(tmp_path, folder, other)
    assert table.open_folder(tmp_path, folder, SETTINGS) == folder


def test_report_only_reports_the_finished_cells_and_computes_nothing(filled, tmp_path):
    folder, _ = filled
    copy = tmp_path / "partial"
    (copy / "cells").mkdir(parents=True)
    for path in (folder / "cells").iterdir():
        if "cau-local" not in path.name or "gru4rec" in path.name:
            (copy / "cells" / path.name).write_text(path.read_text())
    lines: list[str] = []
    datas = {0: toy_sessions(50, seed=0)}
    table.fill(copy, ("sasrec", "gru4rec"), (0,), SETTINGS, METHODS, datas, lines.append,
               report_only=True)
    assert not lines and not (copy / "models").exists()
    frame = pd.read_csv(copy / "cau_table.csv")
    assert len(frame) == 2 * len(METHODS) - 1
    assert "| sasrec | cau-local |" not in (copy / "cau_table.md").read_text()
    assert "| gru4rec | cau-local | 1 |" in (copy / "cau_table.md").read_text()
    with pytest.raises(FedShareError, match="give it with --resume"):
        table.cau_table(("sasrec",), (0,), SETTINGS, report_only=True)
