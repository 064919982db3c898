"""The artifact service and the containers' fetch step, over real HTTP on loopback (no docker needed)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading

import pytest

from layerline.engines.swarm.artifacts import ArtifactServer, write_manifest
from layerline.engines.swarm.fetch import fetch_files
from layerline.errors import EngineError, FormatError


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "deploy"
    (root / "stages").mkdir(parents=True)
    big = bytes(range(256)) * 20000  # 5 MB: several chunks
    (root / "stages" / "stage0.onnx").write_bytes(big)
    (root / "stages" / "stage0.json").write_text('{"x": 1}')
    (root / "secret.txt").write_text("not listed")
    write_manifest(root, [root / "stages" / "stage0.onnx", root / "stages" / "stage0.json"])
    server = ArtifactServer(root, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}", big
    server.shutdown()
    server.server_close()


def test_fetch_downloads_checks_and_skips_what_is_there(served, tmp_path):
    _, url, big = served
    dest = tmp_path / "node"
    took = fetch_files(url, dest, ["stages/stage0.onnx", "stages/stage0.json"], timeout_s=10)
    assert set(took) == {"stages/stage0.onnx", "stages/stage0.json"}
    assert (dest / "stages" / "stage0.onnx").read_bytes() == big
    assert hashlib.sha256((dest / "stages/stage0.json").read_bytes()).hexdigest()
    # a restarted container finds its files intact and downloads nothing
    assert fetch_files(url, dest, ["stages/stage0.onnx"], timeout_s=10) == {}
    # a damaged local copy is replaced
    (dest / "stages" / "stage0.onnx").write_bytes(b"x" * len(big))
    assert "stages/stage0.onnx" in fetch_files(url, dest, ["stages/stage0.onnx"], timeout_s=10)
    assert (dest / "stages" / "stage0.onnx").read_bytes() == big


def test_only_listed_files_are_served(served, tmp_path):
    _, url, _ = served
    with pytest.raises(EngineError, match="not in the artifact list"):
        fetch_files(url, tmp_path, ["secret.txt"], timeout_s=5)
    import urllib.error
    import urllib.request

    for path in ("/files/secret.txt", "/files/../secret.txt", "/"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + path, timeout=5)
        assert err.value.code == 404


def test_a_file_changed_after_listing_is_refused(served, tmp_path):
    root, url, big = served
    (root / "stages" / "stage0.onnx").write_bytes(b"\x01" + big[1:])
    with pytest.raises(EngineError, match="arrived damaged"):
        fetch_files(url, tmp_path, ["stages/stage0.onnx"], timeout_s=5)
    assert not (tmp_path / "stages" / "stage0.onnx").exists()
    assert not list((tmp_path / "stages").glob("*.part"))


def test_unreachable_service_gives_up_with_the_reason(tmp_path):
    from layerline.runtime.ports import free_port

    url = f"http://127.0.0.1:{free_port('127.0.0.1')}"
    with pytest.raises(EngineError, match="cannot reach the artifact service"):
        fetch_files(url, tmp_path, ["stages/stage0.onnx"], timeout_s=1.0)


def test_cli_fetches_then_becomes_the_command(served, tmp_path):
    _, url, big = served
    dest = tmp_path / "node"
    code = "import pathlib,sys; print(pathlib.Path(sys.argv[1]).stat().st_size)"
    proc = subprocess.run(
        [sys.executable, "-m", "layerline.engines.swarm.fetch", "--url", url, "--root", str(dest),
         "--file", "stages/stage0.onnx", "--", sys.executable, "-c", code, str(dest / "stages/stage0.onnx")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(len(big))
    bad = subprocess.run(
        [sys.executable, "-m", "layerline.engines.swarm.fetch", "--url", url, "--root", str(dest),
         "--file", "nope", "--", "true"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 1 and "not in the artifact list" in bad.stderr


def test_server_refuses_a_foreign_manifest(tmp_path):
    (tmp_path / "artifacts.json").write_text('{"format": "other", "format_version": 9, "files": {}}')
    with pytest.raises(FormatError, match="rebuild the image"):
        ArtifactServer(tmp_path, "127.0.0.1", 0)
