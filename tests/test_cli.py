"""The ``fedshare`` command: data stats, prepare, central runs and one-line user errors.

MovieLens-100K comes from the copy bundled in the installed ``recbole`` wheel; the download
function is replaced so that no test can reach the network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fedshare.data.loaders as loaders
from simulations.cli import main

ML100K_AVAILABLE = loaders.recbole_ml100k_dir() is not None
needs_ml100k = pytest.mark.skipif(not ML100K_AVAILABLE,
                                  reason="the recbole wheel with MovieLens-100K is not installed")
CONSOLE_SCRIPT = Path(sys.executable).with_name("fedshare")


pytestmark = pytest.mark.usefixtures("offline")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code: int, err: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fedshare: error:")


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _check_ml100k_stats(stats: dict) -> None:
    assert stats["dataset"] == "ml-100k"
    assert stats["users"] == 943
    assert stats["items"] == 1682
    assert stats["interactions"] == 100_000
    split = stats["split"]
    assert split["train"] + split["valid"] + split["test"] == 100_000
    assert split["train"] > 0.75 * 100_000
    assert sum(stats["sharing_groups"].values()) == 943
    assert set(stats["sharing_groups"]) == {"full", "partial", "none"}
    use = stats["interactions_by_use"]
    assert use["local"] + use["shared"] == split["train"]
    assert 0 < use["to_unlearn"] <= use["shared"]


# ----------------------------------------------------------------------------- data stats
@needs_ml100k
def test_data_stats_json(capsys):
    code, out, err = _run(capsys, "data", "stats", "--dataset", "ml-100k", "--json")
    assert code == 0
    assert "error" not in err
    stats = json.loads(out)
    _check_ml100k_stats(stats)
    assert stats["split_seed"] == 0


@needs_ml100k
def test_data_stats_text(capsys):
    code, out, _ = _run(capsys, "data", "stats")
    assert code == 0
    assert "ml-100k" in out
    assert "943" in out and "1,682" in out and "100,000" in out


@needs_ml100k
def test_data_stats_follows_the_options(capsys):
    code, out, _ = _run(capsys, "data", "stats", "--json", "--split", "0.6,0.2,0.2",
                        "--groups", "0.5,0.5,0", "--split-seed", "3")
    assert code == 0
    stats = json.loads(out)
    assert stats["split_seed"] == 3
    assert stats["split"]["train"] < 0.65 * 100_000
    assert sum(stats["split"].values()) == 100_000
    assert stats["sharing_groups"]["none"] == 0
    assert stats["sharing_groups"]["full"] + stats["sharing_groups"]["partial"] == 943
    assert stats["sharing"]["group_fractions"] == [0.5, 0.5, 0.0]


# ----------------------------------------------------------------------------- user errors
CONFIG = Path(__file__).resolve().parents[1] / "simulations" / "configs" / "fedshare.toml"


@pytest.mark.parametrize("argv", [
    ["data", "stats", "--dataset", "no-such-dataset"],
    ["data", "stats", "--split", "0.5,0.2,0.1"],
    ["data", "stats", "--split", "0.8,0.2"],
    ["data", "stats", "--groups", "0.5,0.5,0.5"],
    ["data", "stats", "--partial-share", "1.5"],
    ["data", "stats", "--path", "/nonexistent/fedshare/ml-100k"],
    ["data", "prepare", "--dataset", "nope", "--out", "unused"],
    ["central", "--model", "popularity", "--dataset", "nope"],
    ["deploy", "--devices", "0", "--dir", "unused"],
    ["deploy", "--devices", "5000", "--dir", "unused"],
    ["deploy", "--set", "no-such-key=1", "--dir", "unused"],
    ["run", "--resume", "unused"],
    ["run", "--resume", "unused", "--config", "simulations/configs/fedshare.toml"],
    ["run", "--config", str(CONFIG), "--set", "unlearn=true", "--set", "unlearning=foo",
     "--out", "unused"],
    ["run", "--config", str(CONFIG), "--set", "replay-interval=abc", "--out", "unused"],
    ["cau-table", "--backbone", "bert4rec", "--out", "unused"],
    ["cau-table", "--methods", "original,nope", "--out", "unused"],
    ["cau-table", "--batch-size", "0", "--out", "unused"],
    ["cau-table", "--resume", "unused"],
    ["run", "--set", "family=sequence", "--set", "seq-backbone=bert4rec", "--out", "unused"],
    ["run", "--set", "family=sequence", "--set", "seq-server-lr=0", "--engine", "inprocess",
     "--out", "unused"],
    ["run", "--set", "family=sequence", "--set", "seq-data=/nonexistent/sessions", "--out",
     "unused"],
    ["run", "--set", "family=gnn", "--out", "unused"],
    ["run", "--set", "family=sequence", "--set", "unlearn=true", "--set",
     "seq-unlearning=nope", "--out", "unused"],
    ["run", "--set", "family=sequence", "--set", "unlearn=true", "--set",
     "seq-cau-batch-size=0", "--out", "unused"],
    ["run", "--set", "family=sequence", "--set", "unlearn=true", "--engine", "inprocess",
     "--out", "unused"],
    ["deploy", "--set", "family=sequence", "--dir", "unused"],
    ["privacy-audit", "--settings", "device,nope", "--out", "unused"],
    ["privacy-audit", "--users", "0", "--out", "unused"],
    ["privacy-audit", "--settings", "cohort-1", "--out", "unused"],
    ["privacy-audit", "--resume", "unused"],
    ["privacy-audit", "--set", "dataset=nope", "--out", "unused"],
    ["run", "--set", "defence=secagg+nope", "--out", "unused"],
    ["run", "--set", "defence=hidden", "--set", "unlearn=true", "--set", "unlearning=cufru",
     "--set", "defence=hidden", "--out", "unused"],
], ids=["unknown-dataset", "split-sum", "split-len", "groups-sum", "partial-range",
        "missing-path", "prepare-unknown", "central-unknown", "deploy-no-device",
        "deploy-too-many", "deploy-unknown-key", "resume-no-store", "resume-and-config",
        "unknown-unlearning-method", "bad-replay-setting", "cau-unknown-backbone",
        "cau-unknown-method", "cau-batch-zero", "cau-resume-not-a-table",
        "sequence-unknown-backbone", "sequence-bad-server-lr", "sequence-missing-data",
        "unknown-family", "sequence-unknown-unlearning", "sequence-unlearning-batch-zero",
        "sequence-unlearning-inprocess", "deploy-sequence", "privacy-unknown-setting",
        "privacy-no-users", "privacy-cohort-of-one", "privacy-resume-not-an-audit",
        "privacy-unknown-dataset", "unknown-defence", "hidden-with-cufru"])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(capsys, *argv)
    _assert_one_line_error(code, err)
    assert out == ""
    assert not (tmp_path / "unused").exists()


def test_path_without_the_dataset_files(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = _run(capsys, "data", "stats", "--path", str(tmp_path / "empty"))
    _assert_one_line_error(code, err)
    assert "u.data" in err


def test_unparsable_dataset_file(capsys, tmp_path):
    bad = tmp_path / "u.data"
    bad.write_text("1\t2\tfive\t100\n")
    code, _, err = _run(capsys, "data", "stats", "--path", str(bad))
    _assert_one_line_error(code, err)


def _write_small_ml100k(path: Path, num_users: int = 30, num_items: int = 50) -> Path:
    """A synthetic u.data: every user rates 25 random items."""
    rng = np.random.default_rng(0)
    lines = []
    for u in range(1, num_users + 1):
        for i in rng.choice(num_items, 25, replace=False):
            lines.append(f"{u}\t{i + 1}\t{int(rng.integers(1, 6))}\t{1000 + len(lines)}")
    path.mkdir(parents=True, exist_ok=True)
    (path / "u.data").write_text("\n".join(lines) + "\n")
    return path


def test_stats_of_a_local_folder(capsys, tmp_path):
    folder = _write_small_ml100k(tmp_path / "small")
    code, out, _ = _run(capsys, "data", "stats", "--path", str(folder), "--json")
    assert code == 0
    stats = json.loads(out)
    assert stats["users"] == 30
    assert stats["interactions"] == 30 * 25
    assert sum(stats["split"].values()) == 750
    assert sum(stats["sharing_groups"].values()) == 30


# ----------------------------------------------------------------------------- prepare
@needs_ml100k
def test_prepare_then_read_back_gives_identical_stats(capsys, tmp_path):
    out_dir = tmp_path / "prepared"
    code, out, err = _run(capsys, "data", "prepare", "--out", str(out_dir), "--split-seed", "2",
                        "--plan-seed", "5")
    assert code == 0, err
    assert str(out_dir) in out
    assert (out_dir / "meta.json").is_file() and (out_dir / "interactions.npz").is_file()

    code, direct, _ = _run(capsys, "data", "stats", "--json", "--split-seed", "2",
                           "--plan-seed", "5")
    assert code == 0
    code, reread, _ = _run(capsys, "data", "stats", "--json", "--prepared", str(out_dir))
    assert code == 0
    assert json.loads(reread) == json.loads(direct)
    _check_ml100k_stats(json.loads(reread))
    assert json.loads(reread)["split_seed"] == 2
    assert json.loads(reread)["sharing"]["seed"] == 5


def test_prepare_small_folder_round_trip(capsys, tmp_path):
    folder = _write_small_ml100k(tmp_path / "small")
    out_dir = tmp_path / "nested" / "prepared"
    code, _, _ = _run(capsys, "data", "prepare", "--path", str(folder), "--out", str(out_dir),
                      "--groups", "0.2,0.3,0.5")
    assert code == 0
    code, direct, _ = _run(capsys, "data", "stats", "--json", "--path", str(folder),
                           "--groups", "0.2,0.3,0.5")
    code2, reread, _ = _run(capsys, "data", "stats", "--json", "--prepared", str(out_dir))
    assert code == code2 == 0
    assert json.loads(reread) == json.loads(direct)


@needs_ml100k
@pytest.mark.parametrize("existing", ["plain", "prepared"])
def test_prepare_into_existing_folder_fails_and_leaves_it_alone(capsys, tmp_path, existing):
    target = tmp_path / "target"
    if existing == "plain":
        target.mkdir()
        (target / "keep.txt").write_text("do not touch")
    else:
        assert main(["data", "prepare", "--out", str(target), "--split-seed", "1"]) == 0
        capsys.readouterr()
    before = _tree(target)
    siblings = sorted(p.name for p in tmp_path.iterdir())

    code, out, err = _run(capsys, "data", "prepare", "--out", str(target))
    _assert_one_line_error(code, err)
    assert "exists" in err
    assert out == ""
    assert _tree(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == siblings  # no half-written folder


def _prepared(tmp_path: Path) -> Path:
    folder = _write_small_ml100k(tmp_path / "src")
    out_dir = tmp_path / "prepared"
    assert main(["data", "prepare", "--path", str(folder), "--out", str(out_dir)]) == 0
    return out_dir


def _corrupt(folder: Path, how: str) -> None:
    meta_path, npz_path = folder / "meta.json", folder / "interactions.npz"
    if how == "meta-not-json":
        meta_path.write_text("{ this is not json")
    elif how == "meta-missing":
        meta_path.unlink()
    elif how == "npz-missing":
        npz_path.unlink()
    elif how == "npz-truncated":
        npz_path.write_bytes(npz_path.read_bytes()[:100])
    elif how == "fingerprint-mismatch":
        meta = json.loads(meta_path.read_text())
        meta["fingerprint"] = "0" * 16
        meta_path.write_text(json.dumps(meta))
    elif how == "wrong-format-version":
        meta = json.loads(meta_path.read_text())
        meta["format"] = 99
        meta_path.write_text(json.dumps(meta))
    elif how == "meta-not-an-object":
        meta_path.write_text("[]")
    elif how == "meta-missing-keys":
        meta_path.write_text(json.dumps({"format": 1}))
    elif how == "npz-missing-array":
        with np.load(npz_path) as z:
            arrays = {k: z[k] for k in z.files if k != "group"}
        np.savez(npz_path.with_suffix(""), **arrays)  # numpy appends .npz again
    elif how == "num-users-too-small":
        meta = json.loads(meta_path.read_text())
        meta["num_users"] = 3
        meta_path.write_text(json.dumps(meta))
    else:  # pragma: no cover
        raise AssertionError(how)


@pytest.mark.parametrize("how", [
    "meta-not-json", "meta-missing", "npz-missing", "npz-truncated", "fingerprint-mismatch",
    "wrong-format-version", "meta-not-an-object", "meta-missing-keys", "npz-missing-array",
    "num-users-too-small",
])
def test_corrupt_prepared_folder_is_one_line_error(capsys, tmp_path, how):
    folder = _prepared(tmp_path)
    capsys.readouterr()
    _corrupt(folder, how)
    code, out, err = _run(capsys, "data", "stats", "--prepared", str(folder))
    _assert_one_line_error(code, err)
    assert out == ""


def test_missing_prepared_folder(capsys, tmp_path):
    code, _, err = _run(capsys, "data", "stats", "--prepared", str(tmp_path / "nowhere"))
    _assert_one_line_error(code, err)


# ----------------------------------------------------------------------------- central
@needs_ml100k
def test_central_popularity_writes_summary_once(capsys, tmp_path):
    out_dir = tmp_path / "run"
    code, out, err = _run(capsys, "central", "--model", "popularity", "--dataset", "ml-100k",
                          "--out", str(out_dir))
    assert code == 0, err
    assert "popularity on ml-100k" in out
    summary_path = out_dir / "summary.json"
    summary = json.loads(summary_path.read_text())
    assert summary["model"] == "popularity"
    assert summary["dataset"] == "ml-100k"
    assert len(summary["fingerprint"]) == 16
    assert 0.6 < summary["test"]["hr@20"] < 0.8
    assert 0.6 < summary["valid"]["hr@20"] < 0.8
    for part in ("valid", "test"):
        assert set(summary[part]) == {"hr@20", "recall@20", "ndcg@20"}
        assert 0.0 < summary[part]["ndcg@20"] < summary[part]["hr@20"]
    # only the summary is left in the folder (no temporary files)
    assert sorted(p.name for p in out_dir.iterdir()) == ["summary.json"]

    before = summary_path.read_bytes()
    mtime = summary_path.stat().st_mtime_ns
    code, out, err = _run(capsys, "central", "--model", "popularity", "--dataset", "ml-100k",
                          "--out", str(out_dir))
    _assert_one_line_error(code, err)
    assert "already exists" in err
    assert summary_path.read_bytes() == before
    assert summary_path.stat().st_mtime_ns == mtime


@needs_ml100k
def test_central_popularity_json_matches_summary(capsys, tmp_path):
    code, out, _ = _run(capsys, "central", "--model", "popularity", "--json", "--out",
                        str(tmp_path / "r"))
    assert code == 0
    printed = json.loads(out)
    assert printed == json.loads((tmp_path / "r" / "summary.json").read_text())


def test_central_mf_on_prepared_small_data(capsys, tmp_path):
    folder = _prepared(tmp_path)
    capsys.readouterr()
    code, out, err = _run(capsys, "central", "--model", "mf", "--prepared", str(folder),
                          "--epochs", "2", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["model"] == "mf"
    assert summary["config"]["max_epochs"] == 2
    assert summary["best_epoch"] in (1, 2)
    for part in ("valid", "test"):
        assert all(0.0 <= v <= 1.0 for v in summary[part].values())


def test_central_with_zero_epochs_is_a_user_error(capsys, tmp_path):
    """``--epochs 0`` trains nothing; it must end as one error line, not a traceback."""
    folder = _prepared(tmp_path)
    capsys.readouterr()
    code = main(["central", "--model", "mf", "--prepared", str(folder), "--epochs", "0",
                 "--out", str(tmp_path / "zero")])
    err = capsys.readouterr().err
    _assert_one_line_error(code, err)
    assert not (tmp_path / "zero" / "summary.json").exists()


# ----------------------------------------------------------------------------- console script
@pytest.fixture(scope="module")
def console_runs(tmp_path_factory):
    """Run the installed console script for a few cases, in parallel (each starts torch)."""
    if not CONSOLE_SCRIPT.exists():
        pytest.fail(f"console script {CONSOLE_SCRIPT} is not installed")
    cache = tmp_path_factory.mktemp("cache")
    env = {**os.environ, "FEDSHARE_DATA": str(cache)}
    cases = {
        "stats": ["data", "stats", "--dataset", "ml-100k", "--json"],
        "unknown": ["data", "stats", "--dataset", "no-such-dataset", "--split", "0.7,0.7,0.7"],
    }
    if not ML100K_AVAILABLE:
        del cases["stats"]
    procs = {name: subprocess.Popen([str(CONSOLE_SCRIPT), *argv], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env)
             for name, argv in cases.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        results[name] = (proc.returncode, out, err)
    return results


@needs_ml100k
def test_console_script_stats(console_runs):
    code, out, err = console_runs["stats"]
    assert code == 0, err
    _check_ml100k_stats(json.loads(out))


def test_console_script_error(console_runs):
    code, out, err = console_runs["unknown"]
    _assert_one_line_error(code, err)
    assert "no-such-dataset" in err
    assert out == ""


def test_deploy_refuses_a_folder_in_use(capsys, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    code, _, err = _run(capsys, "deploy", "--dir", str(tmp_path))
    _assert_one_line_error(code, err)
    assert "not empty" in err and [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
