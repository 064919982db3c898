"""`layerline image`: argument handling and its errors (the docker work is tested in tests/engines/swarm)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from layerline.cli.main import build_parser


def test_docker_host_goes_before_or_after_the_action():
    parser = build_parser()
    assert (
        parser.parse_args(["image", "load", "f.tar", "--docker-host", "unix:///a"]).docker_host == "unix:///a"
    )
    args = parser.parse_args(["image", "--docker-host", "unix:///b", "copy", "--to", "unix:///c"])
    assert (args.docker_host, args.to) == ("unix:///b", ["unix:///c"])
    assert parser.parse_args(["image", "save", "-o", "x.tar"]).docker_host is None


@pytest.mark.skipif(shutil.which("docker") is None, reason="the docker CLI is not installed")
def test_loading_a_missing_file_says_how_to_make_it(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "layerline.cli.main", "image", "load", str(tmp_path / "none.tar")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1
    assert "no image file" in out.stderr and "layerline image save" in out.stderr


def test_push_without_a_registry_is_a_usage_error():
    out = subprocess.run(
        [sys.executable, "-m", "layerline.cli.main", "image", "push"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "--registry" in out.stderr
