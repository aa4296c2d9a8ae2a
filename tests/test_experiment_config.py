"""``fedshare run``: config files, ``--set`` overrides, validation before any work, and the
in-process engine's run folder (on a tiny synthetic prepared dataset)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from synthetic import tiny_prepared

import simulations.experiment as experiment_module
from fedshare.data.prepared import PreparedData
from fedshare.errors import FedShareError
from fedshare.federated.config import VARIANTS, FederatedConfig
from fedshare.runconfig import APP_KEYS, DATA_KEYS
from simulations.cli import main
from simulations.experiment import DATA_DEFAULTS, Experiment, parse_value, resolve, run_experiment

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "simulations" / "configs").glob("*.toml"))
NUM_USERS, NUM_ITEMS, DIM = 10, 40, 8


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return tiny_prepared().save(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture
def config_file(tmp_path) -> Path:
    path = tmp_path / "my-run.toml"
    path.write_text('[run]\nvariant = "wo-cl"\nrounds = 7\nserver-lr = 1\n\n'
                    "[federation]\nnum-supernodes = 3\n")
    return path


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fedshare: error:")
    for fragment in fragments:
        assert fragment in lines[0]


# ------------------------------------------------------------------------ resolve
def test_resolve_defaults_cover_every_run_config_key():
    experiment = resolve(None)
    assert experiment.name == "default"
    assert experiment.num_supernodes == 2 == experiment.run["num-nodes"]
    assert experiment.config == FederatedConfig()
    for key, value in {**DATA_DEFAULTS, **FederatedConfig().to_run_config()}.items():
        assert experiment.run[key] == value
    assert set(experiment.run) <= set(FederatedConfig().to_run_config()) | set(DATA_KEYS) | \
        set(APP_KEYS)


def test_data_defaults_match_pyproject():
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert {k: table[k] for k in DATA_KEYS} == DATA_DEFAULTS


def test_resolve_reads_the_file_and_applies_overrides(config_file):
    experiment = resolve(config_file, ["fraction=0.25", "local-epochs=2", "variant=wo-bpr",
                                       "dataset = ml-1m", 'data-path="/some where/x"',
                                       "tau=1", "seed=-3"])
    assert experiment.name == "my-run"
    assert experiment.num_supernodes == 3 == experiment.run["num-nodes"]
    run = experiment.run
    assert run["rounds"] == 7 and isinstance(run["rounds"], int)  # from the file
    assert run["fraction"] == 0.25 and isinstance(run["fraction"], float)
    assert run["local-epochs"] == 2 and isinstance(run["local-epochs"], int)
    assert run["variant"] == "wo-bpr"  # a bare word stays a string; --set beats the file
    assert run["dataset"] == "ml-1m"
    assert run["data-path"] == "/some where/x"
    config = experiment.config
    assert (config.variant, config.rounds, config.fraction, config.local_epochs) == \
        ("wo-bpr", 7, 0.25, 2)
    assert config.server_lr == 1.0 and isinstance(config.server_lr, float)
    assert config.tau == 1.0 and isinstance(config.tau, float)
    assert config.seed == -3
    assert resolve(config_file, name="other").name == "other"


@pytest.mark.parametrize(("text", "expected"), [
    ("3", 3), ("-2", -2), ("0.5", 0.5), ("1e-3", 1e-3), ("true", True), ('"3"', "3"),
    ("fedshare", "fedshare"), ("ml-100k", "ml-100k"), ("/tmp/x", "/tmp/x"), ("", ""),
])
def test_parse_value_types(text, expected):
    value = parse_value(text)
    assert value == expected
    assert type(value) is type(expected)


def test_num_supernodes_from_file_and_set(config_file):
    assert resolve(config_file, ["num-supernodes=5"]).num_supernodes == 5
    experiment = resolve(None, ["num-supernodes=4"])
    assert experiment.num_supernodes == 4 == experiment.run["num-nodes"]
    assert "num-supernodes" not in experiment.run


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "two", "true"])
def test_num_supernodes_must_be_a_positive_integer(value):
    with pytest.raises(FedShareError, match="num-supernodes"):
        resolve(None, [f"num-supernodes={value}"])


@pytest.mark.parametrize("sets", [["bogus=1"], ["rounds=3", "learning-rate=0.1"],
                                  ["local_epochs=2"], ["num-supernode=2"]])
def test_unknown_keys_are_rejected(sets):
    with pytest.raises(FedShareError, match="unknown"):
        resolve(None, sets)


@pytest.mark.parametrize("text", ['[runs]\nrounds = 2\n', '[run]\nrounds = 2\n[extra]\na = 1\n',
                                  'rounds = 2\n', '[run]\nbogus = 1\n',
                                  '[federation]\nnum-supernodes = 2\nnodes = 3\n'])
def test_unknown_tables_and_keys_in_a_file_are_rejected(tmp_path, text):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(FedShareError, match="unknown"):
        resolve(path)


def test_missing_and_invalid_files_are_rejected(tmp_path):
    with pytest.raises(FedShareError, match="not found"):
        resolve(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[run\nrounds = \n")
    with pytest.raises(FedShareError, match="not valid TOML"):
        resolve(broken)
    with pytest.raises(FedShareError, match="key=value"):
        resolve(None, ["rounds"])


@pytest.mark.parametrize("sets", [
    ["rounds=0"], ["fraction=1.5"], ["fraction=0"], ["variant=fedprox"], ["tau=0"],
    ["aggregation=median"], ["rounds=many"], ["dim=-4"], ["eval-every=0"], ["rounds=2.5"],
], ids=lambda sets: sets[0])
def test_invalid_values_are_rejected_by_resolve(sets):
    with pytest.raises(FedShareError):
        resolve(None, sets)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_resolves(path):
    experiment = resolve(path)
    assert experiment.name == path.stem
    config = experiment.config
    assert config.variant in VARIANTS
    assert experiment.num_supernodes >= 1
    table = tomllib.loads(path.read_text())
    for key, value in table.get("run", {}).items():
        assert experiment.run[key] == value
    if "faithful" in path.stem:  # the paper's Eq. 16 as written
        assert (config.aggregation, config.server_lr, config.local_epochs) == ("eq16", 1.0, 1)


def test_shipped_configs_cover_every_variant():
    assert {resolve(p).config.variant for p in CONFIGS} == set(VARIANTS)


# --------------------------------------------------------------- in-process runs
def _tiny_experiment(prepared: Path, *extra: str) -> Experiment:
    return resolve(None, [f"prepared={prepared}", "rounds=2", "eval-every=1", "fraction=0.5",
                          f"dim={DIM}", "server-steps=2", "local-epochs=1", *extra], name="tiny")


def test_run_experiment_inprocess_writes_the_run_folder(prepared, tmp_path):
    experiment = _tiny_experiment(prepared)
    lines: list[str] = []
    out, summary = run_experiment(experiment, tmp_path / "runs", "inprocess", lines.append)
    assert out.parent == (tmp_path / "runs").resolve() and out.name.startswith("tiny-")
    assert {p.name for p in out.iterdir()} >= {"config.toml", "metrics.csv", "summary.json",
                                               "item_table.npy"}
    written = tomllib.loads((out / "config.toml").read_text())
    assert written == {**experiment.run, "out-dir": str(out)}
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["round"].tolist() == [1, 2]
    assert {"valid_hr@20", "valid_ndcg@20", "valid_recall@20"} <= set(metrics.columns)
    assert len(lines) == 3 and lines[0].startswith("run tiny: fedshare, 2 rounds")
    assert lines[1].startswith("round 1")
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["engine"] == "inprocess" and summary["rounds"] == 2
    assert summary["variant"] == "fedshare"
    data = PreparedData.load(prepared)
    assert summary["shared_interactions"] == int(data.plan.shared.sum())
    for part in ("valid", "test"):
        assert set(summary[part]) == {"hr@20", "recall@20", "ndcg@20"}
        assert all(0.0 <= v <= 1.0 for v in summary[part].values())
    assert summary["valid"]["hr@20"] == pytest.approx(metrics["valid_hr@20"].iloc[-1])
    table = np.load(out / "item_table.npy")
    assert table.shape == (NUM_ITEMS, DIM) and table.dtype == np.float32
    assert np.isfinite(table).all()
    # the same settings give the same table: the run is a pure function of its config
    again, _ = run_experiment(experiment, tmp_path / "runs", "inprocess")
    assert again != out
    np.testing.assert_array_equal(np.load(again / "item_table.npy"), table)


def test_no_sharing_run_reports_no_shared_interactions(prepared, tmp_path):
    _, summary = run_experiment(_tiny_experiment(prepared, "variant=no-sharing"), tmp_path,
                                "inprocess")
    assert summary["shared_interactions"] == 0 and summary["variant"] == "no-sharing"


def test_unknown_engine_is_rejected_before_writing(prepared, tmp_path):
    with pytest.raises(FedShareError, match="engine"):
        run_experiment(_tiny_experiment(prepared), tmp_path / "runs", "ray")
    assert not (tmp_path / "runs").exists()


# -------------------------------------------------------------------------- CLI
@pytest.fixture
def no_runs(monkeypatch):
    """Fail loudly if the CLI reached any engine."""

    def refuse(*args, **kwargs):
        raise AssertionError("a run started despite invalid input")

    monkeypatch.setattr(experiment_module, "run_flower", refuse)
    monkeypatch.setattr(experiment_module, "_run_inprocess", refuse)


@pytest.mark.parametrize(("argv", "fragment"), [
    (["--set", "bogus=1"], "bogus"),
    (["--config", "missing.toml"], "missing.toml"),
    (["--set", "rounds=0"], "rounds"),
    (["--set", "num-supernodes=0"], "num-supernodes"),
    (["--set", "variant=fedprox"], "fedprox"),
    (["--set", "rounds"], "key=value"),
])
def test_cli_run_bad_input_is_one_line_exit_2(capsys, tmp_path, monkeypatch, no_runs, argv,
                                              fragment):
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(capsys, "run", *argv, "--engine", "inprocess", "--out",
                          str(tmp_path / "runs"))
    _assert_one_line_error(code, err, fragment)
    assert out == ""
    assert not (tmp_path / "runs").exists()


def test_cli_run_usage_error_is_one_line_exit_2(capsys, no_runs):
    code, _, err = _run(capsys, "run", "--engine", "ray")
    _assert_one_line_error(code, err)


def test_cli_run_inprocess(capsys, tmp_path, prepared, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "tiny.toml"
    config.write_text(f'[run]\nprepared = "{prepared}"\nrounds = 2\neval-every = 1\n'
                      f"dim = {DIM}\nserver-steps = 1\nlocal-epochs = 1\n")
    code, out, err = _run(capsys, "run", "--config", str(config), "--set", "fraction=0.5",
                          "--engine", "inprocess", "--out", "runs")
    assert code == 0, err
    assert out.startswith("tiny: test HR@20")
    assert len(out.strip().splitlines()) == 1
    assert "engine inprocess" in err and "round 2" in err
    (folder,) = (tmp_path / "runs").iterdir()
    assert str(folder) in out
    summary = json.loads((folder / "summary.json").read_text())
    assert f"{summary['test']['hr@20']:.4f}" in out
    assert tomllib.loads((folder / "config.toml").read_text())["fraction"] == 0.5


def test_bad_data_fails_before_any_folder_or_process(tmp_path, capsys):
    code, _, err = _run(capsys, "run", "--set", f"prepared={tmp_path / 'missing'}",
                        "--out", str(tmp_path / "runs"))
    assert code == 2 and err.count("\n") == 1 and err.startswith("fedshare: error:")
    assert not (tmp_path / "runs").exists()
