"""Shared fixtures."""

from __future__ import annotations

import pytest

from fedshare.data import loaders


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Point the dataset cache at a fresh folder and make any download attempt fail loudly."""
    monkeypatch.setenv("FEDSHARE_DATA", str(tmp_path / "cache"))

    def no_network(*args, **kwargs):
        raise AssertionError(f"a test tried to download: {args}")

    monkeypatch.setattr(loaders, "fetch", no_network)
    monkeypatch.setattr("urllib.request.urlopen", no_network)


# Tests that start real processes (Flower SuperLinks and SuperNodes, Ray, deployments): under
# `pytest -n 2 --dist loadgroup` (`make test`) they run one after another on one worker, so
# two never compete for ports, Ray or the cores' time-outs, while the other worker runs the
# in-process tests. Every other module is one group, so a module fixture is built once.
PROCESS_MODULES = {
    "test_bench", "test_cli", "test_deployment", "test_experiment_config", "test_flower_app",
    "test_flower_replay", "test_flower_startup", "test_flower_unlearning", "test_kill_and_resume",
    "test_ray_cluster", "test_run_lease", "test_sequence_flower", "test_stopping_commands",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rpartition(".")[2]
        group = "processes" if module in PROCESS_MODULES else module
        item.add_marker(pytest.mark.xdist_group(group))
