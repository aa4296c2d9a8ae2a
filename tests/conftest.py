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
