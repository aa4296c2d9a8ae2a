"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch

from fedshare.data import loaders

# One torch thread in every test process, as every ClientApp runs (clients/app.py), whichever
# modules a `pytest -n 2` worker happens to import: two workers on two cores, and reductions
# that add in one order whatever the machine.
torch.set_num_threads(1)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Point the dataset cache at a fresh folder and make any download attempt fail loudly."""
    monkeypatch.setenv("FEDSHARE_DATA", str(tmp_path / "cache"))

    def no_network(*args, **kwargs):
        raise AssertionError(f"a test tried to download: {args}")

    monkeypatch.setattr(loaders, "fetch", no_network)
    monkeypatch.setattr("urllib.request.urlopen", no_network)


# Tests that start real processes (Flower SuperLinks and SuperNodes, Ray, deployments): under
# `pytest -n 2` (`make test`) they run one after another on one worker, so two never compete for
# ports, Ray or the cores' time-outs (and a test's check for leftover processes sees only its
# own), while the other worker runs the in-process tests, a module at a time.
PROCESS_MODULES = {
    "test_cdcgnnfed",
    "test_bench", "test_cli", "test_deployment", "test_experiment_config", "test_flower_app",
    "test_flower_replay", "test_flower_startup", "test_flower_unlearning", "test_kill_and_resume",
    "test_pdc_frs", "test_ray_cluster", "test_run_lease", "test_secagg", "test_sequence_flower",
    "test_stopping_commands",
}


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's scope scheduling with one scope for every process-starting module and one per
    other module. (Its ``loadgroup`` mode would do this from markers, but xdist 3.8 renames
    nodes through ``item._nodeid``, which pytest 9.2 no longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ProcessesTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            name = module.rpartition("/")[2].removesuffix(".py")
            return "processes" if name in PROCESS_MODULES else module

    return ProcessesTogether(config, log)


@pytest.fixture
def flower_task_identity(monkeypatch):
    """Flower stamps messages with the run and node of the process (set by a running app);
    tests that build messages outside an app set them."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
