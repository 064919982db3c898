"""The worker image: onnxruntime + numpy + layerline, installed from wheels downloaded on the host.

Nothing inside the image build touches the network (``pip install --no-index``): an image build's pip cannot
verify TLS on machines whose CA bundle reaches pip through host-only environment variables, and an
air-gapped fleet needs the same wheel folder anyway. The host downloads the wheels (for the image's Python
and platform, pinned to the versions installed here) and builds layerline's own wheel from its source tree.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from layerline.engines.swarm.docker import DockerCli
from layerline.errors import EngineError

__all__ = [
    "DEFAULT_BASE_IMAGE",
    "DEFAULT_GATEWAY_IMAGE",
    "DEFAULT_WORKER_IMAGE",
    "DOCKERFILE",
    "GATEWAY_DOCKERFILE",
    "GATEWAY_PACKAGES",
    "BuiltImage",
    "build_gateway_image",
    "build_worker_image",
    "download_wheels",
    "layerline_wheel",
]

log = logging.getLogger(__name__)

DEFAULT_BASE_IMAGE = "python:3.11-slim"
DEFAULT_WORKER_IMAGE = "layerline-worker:latest"
DEFAULT_GATEWAY_IMAGE = "layerline-gateway:latest"
#: What the gateway needs on top of the worker image (their dependencies come along).
GATEWAY_PACKAGES = ("aiohttp", "prometheus_client")

#: Kept identical to docker/Dockerfile.worker (a test checks it). pip runs from its own wheel, so the base
#: image needs only ``python3`` (a Debian minbase with python3 works as well as python:3.11-slim).
DOCKERFILE = """\
# The layerline stage worker: python3 + onnxruntime + numpy + layerline, nothing else.
# Built by layerline.engines.swarm.build_worker_image from a context holding wheels/ (no network in here).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
COPY wheels /wheels
RUN PIP=$(ls /wheels/pip-*.whl) \\
 && python3 "$PIP/pip" install --no-index --find-links /wheels --break-system-packages \\
      --no-cache-dir --no-compile onnxruntime numpy \\
 && python3 "$PIP/pip" install --no-index --no-deps --break-system-packages --no-cache-dir \\
      /wheels/layerline-*.whl \\
 && rm -rf /wheels \\
 && python3 -c "import onnxruntime, numpy, layerline.runtime.worker"
ENV PYTHONUNBUFFERED=1
ENTRYPOINT ["python3", "-m", "layerline.runtime.worker"]
CMD ["--config", "/config/worker.json"]
"""

#: The gateway: the worker image plus aiohttp and prometheus_client (a small layer; the stage workers'
#: image stays onnxruntime + numpy + layerline only).
GATEWAY_DOCKERFILE = """\
ARG WORKER_IMAGE=layerline-worker:latest
FROM ${WORKER_IMAGE}
COPY wheels /wheels
RUN PIP=$(ls /wheels/pip-*.whl) \\
 && python3 "$PIP/pip" install --no-index --find-links /wheels --break-system-packages \\
      --no-cache-dir --no-compile aiohttp prometheus_client \\
 && rm -rf /wheels \\
 && python3 -c "import layerline.engines.gateway_main"
ENTRYPOINT ["python3", "-m", "layerline.engines.gateway_main"]
CMD ["--config", "/config/gateway.json"]
"""

_PLATFORMS = {
    "x86_64": ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"),
    "aarch64": ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"),
}


@dataclass(frozen=True)
class BuiltImage:
    tag: str
    base_image: str
    size_bytes: int
    build_s: float


def _pip(args: list[str], what: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=900, check=False
    )
    if proc.returncode != 0:
        raise EngineError(
            f"{what} failed (pip exit {proc.returncode}):\n{(proc.stderr or proc.stdout)[-2000:]}\n"
            "check that this machine reaches the package index, or pass a folder of wheels (wheels=...)"
        )


def download_wheels(
    dest: Path, python_version: str = "3.11", arch: str | None = None, packages: tuple[str, ...] = ()
) -> Path:
    """Download onnxruntime, numpy (the versions installed here) and pip wheels for the image to ``dest``."""
    arch = arch or platform.machine()
    if arch not in _PLATFORMS:
        raise EngineError(
            f"no wheel platform known for architecture {arch!r}; use one of {sorted(_PLATFORMS)}"
        )
    pins = packages or tuple(
        f"{name}=={importlib.metadata.version(name)}" for name in ("onnxruntime", "numpy", "pip")
    )
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [arg for plat in _PLATFORMS[arch] for arg in ("--platform", plat)]
    _pip(
        [
            "download",
            "--only-binary=:all:",
            "--python-version",
            python_version,
            *platforms,
            "-d",
            str(dest),
            *list(pins),
        ],
        f"downloading the worker's wheels ({', '.join(pins)})",
    )
    return dest


def _source_tree() -> Path:
    import layerline

    root = Path(layerline.__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise EngineError(
            f"layerline is not installed from a source tree ({root} has no pyproject.toml), so its wheel "
            "cannot be built here; pass layerline_wheel=PATH to a layerline wheel"
        )
    return root


def layerline_wheel(dest: Path) -> Path:
    """Build layerline's own wheel (no dependencies) from a copy of its source tree into ``dest``."""
    root = _source_tree()
    with tempfile.TemporaryDirectory(prefix="layerline-src-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            if (root / name).is_file():
                shutil.copy2(root / name, src / name)
        shutil.copytree(
            root / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
        )
        _pip(
            ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dest), str(src)],
            "building layerline's wheel",
        )
    wheels = sorted(dest.glob("layerline-*.whl"))
    if not wheels:
        raise EngineError(f"pip wheel produced no layerline wheel in {dest}")
    return wheels[-1]


def _fill_wheels(wheel_dir: Path, wheels: Path | None, pins: tuple[str, ...], python_version: str) -> None:
    """Copy ``wheels`` into the build context, or download ``pins`` there; check that each pinned package
    has a wheel."""
    if wheels is None:
        download_wheels(wheel_dir, python_version, packages=pins)
    else:
        shutil.copytree(wheels, wheel_dir)
    for name in (pin.split("==")[0] for pin in pins):
        pattern = f"{name}-*.whl"
        if not list(wheel_dir.glob(pattern)):
            raise EngineError(f"the wheel folder {wheels} has no {pattern}; fill it with download_wheels()")


def _docker_build(docker: DockerCli, ctx: Path, build_arg: str, tag: str) -> int:
    """Classic ``docker build`` (every daemon has it) of ``ctx``; the image's size in bytes."""
    log.info("building %s (%s)", tag, build_arg)
    docker.run(
        ["build", "-q", "--build-arg", build_arg, "-t", tag, str(ctx)],
        timeout_s=1800,
        env={"DOCKER_BUILDKIT": "0"},
    )
    return int(docker.run(["image", "inspect", "--format", "{{.Size}}", tag]).strip())


def _pins(names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"{name}=={importlib.metadata.version(name)}" for name in names)


def build_worker_image(
    base_image: str = DEFAULT_BASE_IMAGE,
    tag: str = DEFAULT_WORKER_IMAGE,
    docker: DockerCli | None = None,
    wheels: Path | None = None,
    python_version: str = "3.11",
    layerline_whl: Path | None = None,
) -> BuiltImage:
    """Build the worker image ``tag`` FROM ``base_image`` (which needs ``python3`` of ``python_version``).

    ``wheels``: a folder already holding onnxruntime, numpy and pip wheels for the image (downloaded
    into a temporary folder when None). Uses the classic builder (``DOCKER_BUILDKIT=0``), which every
    daemon has.
    """
    docker = docker or DockerCli()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="layerline-image-") as tmp:
        ctx = Path(tmp)
        (ctx / "Dockerfile").write_text(DOCKERFILE)
        wheel_dir = ctx / "wheels"
        _fill_wheels(wheel_dir, wheels, _pins(("onnxruntime", "numpy", "pip")), python_version)
        for old in wheel_dir.glob("layerline-*.whl"):
            old.unlink()
        if layerline_whl is not None:
            shutil.copy2(layerline_whl, wheel_dir / layerline_whl.name)
        else:
            layerline_wheel(wheel_dir)
        size = _docker_build(docker, ctx, f"BASE_IMAGE={base_image}", tag)
    return BuiltImage(tag, base_image, size, time.monotonic() - t0)


def build_gateway_image(
    worker_image: str = DEFAULT_WORKER_IMAGE,
    tag: str = DEFAULT_GATEWAY_IMAGE,
    docker: DockerCli | None = None,
    wheels: Path | None = None,
    python_version: str = "3.11",
) -> BuiltImage:
    """Build the gateway image ``tag`` FROM ``worker_image`` plus aiohttp and prometheus_client.

    ``wheels``: a folder with those wheels (and their dependencies, and pip); downloaded when None, pinned to
    the versions installed here.
    """
    docker = docker or DockerCli()
    if not docker.run(["image", "ls", "-q", worker_image]).strip():
        raise EngineError(
            f"the worker image {worker_image!r} is not on this daemon; build it first (layerline image build)"
        )
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="layerline-gw-image-") as tmp:
        ctx = Path(tmp)
        (ctx / "Dockerfile").write_text(GATEWAY_DOCKERFILE)
        _fill_wheels(ctx / "wheels", wheels, _pins((*GATEWAY_PACKAGES, "pip")), python_version)
        size = _docker_build(docker, ctx, f"WORKER_IMAGE={worker_image}", tag)
    return BuiltImage(tag, worker_image, size, time.monotonic() - t0)
