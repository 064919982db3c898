"""Fixtures of the runtime tests: a chain of three real worker processes, shared by a module."""

from __future__ import annotations

import pytest
from runtime_models import three_stage_specs

from layerline.runtime.launch import start_local_chain


@pytest.fixture(scope="module")
def three_stage_chain(tmp_path_factory):
    directory = tmp_path_factory.mktemp("three-stage")
    specs = three_stage_specs(directory)
    chain = start_local_chain(specs, workdir=directory / "run")
    try:
        yield chain, specs
    finally:
        chain.stop()
