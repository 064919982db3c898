"""Fixtures shared by every test tier."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def layerline_home(tmp_path_factory, monkeypatch):
    """Each test gets its own deployment state directory, so tests never see the user's deployments."""
    home = tmp_path_factory.mktemp("layerline-home")
    monkeypatch.setenv("LAYERLINE_HOME", str(home))
    return home
