"""``layerline benchmark``: drive one agent per device, time blocks, measure links, build the profile.

[Note: what runs in parallel] Agents of the local engine (and the testbed's devices) share this machine's
cores, so two of them timing blocks at once would slow each other down: devices are measured one after the
other, and links one pair at a time (a transfer must not compete with another). Only the agents' start-up
(imports, no measurement) overlaps. The progress display still shows one bar per device.

[Note: incremental] With a previous profile of the same manifest (same sha256), a device whose engine,
address and cpu_quota are unchanged and that has every requested (block, batch) keeps its measurements;
a link keeps its measurement when both ends were kept and the transfer sizes are the same. ``refresh``
re-measures everything.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from layerline import __version__
from layerline.errors import LayerlineError
from layerline.graph.manifest import MANIFEST_FILE, Manifest
from layerline.profile.agents import (
    AgentClient,
    AgentHandle,
    AgentLaunch,
    await_agent,
    discard_launch,
    launch_agent,
    stop_agent,
)
from layerline.profile.blocks import ChainBlock, ChainPlan
from layerline.profile.cluster import Cluster, DeviceSpec
from layerline.profile.format import (
    BlockMeasurement,
    DeviceProfile,
    Failure,
    LatencyStats,
    LinkMeasurement,
    MemoryUse,
    Profile,
)
from layerline.profile.stats import bandwidth_Bps, median_p90, one_way_latency_s, transfer_sizes

__all__ = [
    "BenchmarkOptions",
    "Progress",
    "chain_plan",
    "cut_sizes",
    "link_from_samples",
    "manifest_sha256",
    "measure_link",
    "run_benchmark",
]

log = logging.getLogger(__name__)


class Progress(Protocol):
    """Where the benchmark reports progress (the CLI draws rich bars; tests pass None)."""

    def start(self, key: str, total: int) -> None: ...
    def update(self, key: str, done: int, total: int) -> None: ...
    def finish(self, key: str, ok: bool, note: str = "") -> None: ...


class BenchmarkOptions:
    """Knobs of one benchmark run (defaults are the CLI's)."""

    def __init__(
        self,
        batch_sizes: Sequence[int] = (1,),
        warmup: int = 3,
        repeats: int = 20,
        pings: int = 20,
        transfer_repeats: int = 3,
        max_transfer_sizes: int = 3,
        threads: int | None = None,
        dims: Mapping[str, int] | None = None,
        refresh: bool = False,
        start_timeout_s: float = 30.0,
        request_timeout_s: float = 300.0,
        cgroup_root: Path | None = None,
    ) -> None:
        if not batch_sizes or any(b < 1 for b in batch_sizes):
            raise ValueError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
        if repeats < 1 or warmup < 0 or pings < 1 or transfer_repeats < 1:
            raise ValueError("repeats, pings and transfer_repeats must be >= 1 and warmup >= 0")
        self.batch_sizes = tuple(sorted(set(batch_sizes)))
        self.warmup, self.repeats, self.pings = warmup, repeats, pings
        self.transfer_repeats, self.max_transfer_sizes = transfer_repeats, max_transfer_sizes
        self.threads, self.dims, self.refresh = threads, dict(dims or {}), refresh
        self.start_timeout_s, self.request_timeout_s = start_timeout_s, request_timeout_s
        self.cgroup_root = cgroup_root


def manifest_sha256(sliced: Path) -> str:
    return hashlib.sha256((Path(sliced) / MANIFEST_FILE).read_bytes()).hexdigest()


def chain_plan(manifest: Manifest, opts: BenchmarkOptions, threads: int) -> ChainPlan:
    blocks = tuple(
        ChainBlock(
            b.index,
            tuple(s.name for s in b.inputs),
            tuple(s.name for s in b.outputs),
            manifest.boundaries[b.index + 1].names,
        )
        for b in manifest.blocks
    )
    return ChainPlan(manifest.inputs, blocks, opts.batch_sizes, opts.warmup, opts.repeats, threads, opts.dims)


def cut_sizes(manifest: Manifest, batch: int, dims: Mapping[str, int] | None = None) -> list[int]:
    """Bytes crossing each inner cut at ``batch`` (model inputs when there is no inner cut)."""
    inner = manifest.boundaries[1:-1] or manifest.boundaries[:1]
    sizes = []
    for boundary in inner:
        total = 0
        for spec in boundary.specs:
            shape = [
                d if isinstance(d, int) else batch if i == 0 else (dims or {}).get(d)
                for i, d in enumerate(spec.shape)
            ]
            if any(s is None for s in shape):
                total = 0
                break
            total += math.prod(shape) * spec.numpy_dtype.itemsize
        if total:
            sizes.append(total)
    return sizes


def link_from_samples(src: str, dst: str, raw: Mapping, sizes: Sequence[int]) -> LinkMeasurement:
    """Turn an agent's raw link samples into a measurement (formulas in ``layerline.profile.stats``)."""
    rtt_med, rtt_p90, _ = median_p90(raw["rtt_s"])
    largest = max(raw["transfers"], key=lambda t: t["size"])
    t_med = median_p90(largest["samples_s"])[0]
    return LinkMeasurement(
        src,
        dst,
        rtt_med,
        rtt_p90,
        one_way_latency_s(rtt_med),
        bandwidth_Bps(int(largest["size"]), t_med, rtt_med),
        tuple(sizes),
        time.time(),
    )


def measure_link(
    client: AgentClient,
    src: str,
    dst: str,
    host: str,
    port: int,
    sizes: Sequence[int],
    pings: int = 20,
    repeats: int = 3,
) -> LinkMeasurement:
    """Have ``client``'s agent measure its link to the agent at ``host:port``."""
    raw = client.link_test(host, port, pings, list(sizes), repeats)
    return link_from_samples(src, dst, raw, sizes)


#: Engines whose agents run on this machine's filesystem: they are given block files by path (no copy of
#: the weights over a socket, let alone over a testbed device's emulated link).
_SAME_FILESYSTEM = ("local", "testbed")


def _block_sources(manifest: Manifest, sliced: Path, by_path: bool) -> dict[int, bytes | str]:
    """Absolute block file paths (``by_path``, or weights in external data), else the files' bytes."""
    out: dict[int, bytes | str] = {}
    for b in manifest.blocks:
        path = (sliced / b.file).resolve()
        out[b.index] = str(path) if (by_path or manifest.external_data or b.data_file) else path.read_bytes()
    return out


def _reusable(prev: Profile | None, spec: DeviceSpec, manifest: Manifest, opts: BenchmarkOptions) -> bool:
    if prev is None or opts.refresh:
        return False
    old = prev.device(spec.name)
    if old is None or (old.engine, old.address, old.cpu_quota) != (spec.engine, spec.address, spec.cpu_quota):
        return False
    if old.hop_overhead_s is None:  # a profile from before hop overheads: measure it once
        return False
    return all(
        prev.block(spec.name, b.index, n) is not None for b in manifest.blocks for n in opts.batch_sizes
    )


def _measure_device(handle: AgentHandle, manifest: Manifest, sources, opts, progress) -> tuple:
    spec = handle.device
    info = handle.client.hello()
    cores = int(info["cores"])
    threads = opts.threads or (max(1, math.ceil(spec.cpu_quota)) if spec.cpu_quota else cores)
    for index, source in sources.items():
        handle.client.load_block(index, source)
    plan = chain_plan(manifest, opts, min(threads, cores))
    results = handle.client.profile(
        plan, None if progress is None else (lambda d, t: progress.update(spec.name, d, t))
    )
    try:
        hop: float | None = handle.client.hop_overhead().for_planning(spec.cpu_quota)
    except (LayerlineError, KeyError, ValueError) as exc:  # an older agent: plan without it
        log.warning("device %s: no hop overhead measured: %s", spec.name, exc)
        hop = None
    now = time.time()
    device = DeviceProfile(
        spec.name,
        spec.address,
        spec.engine,
        cores,
        spec.cpu_quota,
        int(info["memory_total_bytes"]),
        int(info["memory_available_bytes"]),
        spec.memory_bytes or int(info["memory_available_bytes"]),
        now,
        str(info["onnxruntime"]),
        dict(spec.labels),
        hop,
    )
    blocks = []
    for r in results:
        med, p90, low = median_p90(r["samples_s"])
        weights = manifest.blocks[int(r["block"])].weight_bytes
        blocks.append(
            BlockMeasurement(
                spec.name,
                int(r["block"]),
                int(r["batch"]),
                LatencyStats(
                    med,
                    p90,
                    low,
                    len(r["samples_s"]),
                    int(r["warmup"]),
                    mean=sum(r["samples_s"]) / len(r["samples_s"]),
                ),
                MemoryUse(weights, int(r["activations_bytes"]), int(r["rss_delta_bytes"])),
            )
        )
    return device, blocks


class AgentStarter(Protocol):
    """Starts agents this machine cannot spawn itself (see ``run_benchmark(agents=...)``)."""

    def start(
        self, devices: Sequence[DeviceSpec], timeout_s: float, request_timeout_s: float
    ) -> tuple[dict[str, AgentHandle], list[tuple[str, str]]]: ...

    def close(self) -> None: ...


def run_benchmark(
    sliced: str | Path,
    cluster: Cluster,
    opts: BenchmarkOptions | None = None,
    previous: Profile | None = None,
    progress: Progress | None = None,
    agents: AgentStarter | None = None,
) -> Profile:
    """Measure ``cluster`` for the sliced model; devices that fail are listed in ``failures``.

    ``agents``: starts the agents for devices this machine cannot spawn (e.g. swarm nodes:
    :class:`layerline.engines.swarm.agents.SwarmAgents`); closed at the end. Default: local/testbed agents.
    """
    opts = opts or BenchmarkOptions()
    sliced = Path(sliced).resolve()
    manifest = Manifest.load(sliced)
    sha = manifest_sha256(sliced)
    if previous is not None and previous.manifest_sha256 != sha:
        log.info("the manifest changed since the previous profile: re-measuring everything")
        previous = None
    names = cluster.names
    keep = {d.name for d in cluster.devices if _reusable(previous, d, manifest, opts)}
    sizes = list(
        transfer_sizes(cut_sizes(manifest, max(opts.batch_sizes), opts.dims), opts.max_transfer_sizes)
    )
    pairs = [(a, b) for a in names for b in names if a != b]
    kept_links = {}
    for a, b in pairs:
        old = previous.link(a, b) if previous is not None else None
        if a in keep and b in keep and old is not None and list(old.transfer_sizes_bytes) == sizes:
            kept_links[(a, b)] = old
    todo_links = [p for p in pairs if p not in kept_links]
    needed = [d for d in cluster.devices if d.name not in keep or any(d.name in p for p in todo_links)]

    devices: dict[str, DeviceProfile] = {}
    blocks: list[BlockMeasurement] = []
    failures: list[Failure] = []
    for d in cluster.devices:
        if d.name in keep and previous is not None:
            old = previous.device(d.name)
            assert old is not None
            devices[d.name] = replace(
                old, labels=dict(d.labels), memory_budget_bytes=d.memory_bytes or old.memory_available_bytes
            )
            blocks += [m for m in previous.blocks if m.device == d.name and m.batch in opts.batch_sizes]
    total = manifest.num_blocks * len(opts.batch_sizes)
    if progress is not None:
        for d in cluster.devices:
            progress.start(d.name, total)
            if d.name in keep:
                progress.update(d.name, total, total)
                progress.finish(d.name, True, "kept")
        if pairs:
            progress.start("links", len(pairs))

    workdir = Path(tempfile.mkdtemp(prefix="layerline-agents-"))
    handles: dict[str, AgentHandle] = {}
    by_path = all(d.engine in _SAME_FILESYSTEM for d in cluster.devices)
    sources = _block_sources(manifest, sliced, by_path) if len(keep) < len(names) else {}
    launches: dict[str, AgentLaunch] = {}
    try:
        if agents is not None and needed:
            started, refused = agents.start(needed, opts.start_timeout_s, opts.request_timeout_s)
            handles.update(started)
            for name, why in refused:
                failures.append(Failure(name, "agent", why))
                if progress is not None:
                    progress.finish(name, False, "agent failed")
        for d in needed if agents is None else ():  # spawn every agent first: their start-ups overlap
            try:
                launches[d.name] = launch_agent(d, workdir, opts.cgroup_root, cluster.testbed)
            except (LayerlineError, OSError) as exc:
                failures.append(Failure(d.name, "agent", str(exc)))
                if progress is not None:
                    progress.finish(d.name, False, "agent failed")
        for name in list(launches):
            try:
                handles[name] = await_agent(launches.pop(name), opts.start_timeout_s, opts.request_timeout_s)
            except (LayerlineError, OSError) as exc:
                failures.append(Failure(name, "agent", str(exc)))
                if progress is not None:
                    progress.finish(name, False, "agent failed")
        for d in cluster.devices:
            if d.name in keep or d.name not in handles:
                continue
            try:
                devices[d.name], measured = _measure_device(
                    handles[d.name], manifest, sources, opts, progress
                )
                blocks += measured
                if progress is not None:
                    progress.finish(d.name, True)
            except (LayerlineError, OSError, KeyError, ValueError) as exc:
                failures.append(Failure(d.name, "blocks", str(exc)))
                if progress is not None:
                    progress.finish(d.name, False, "failed")
        links: list[LinkMeasurement] = []
        for i, (a, b) in enumerate(pairs):
            if (a, b) in kept_links:
                links.append(kept_links[(a, b)])
            elif a in handles and b in handles and a in devices and b in devices:
                try:
                    links.append(
                        measure_link(
                            handles[a].client,
                            a,
                            b,
                            handles[b].host,
                            handles[b].port,
                            sizes,
                            opts.pings,
                            opts.transfer_repeats,
                        )
                    )
                except (LayerlineError, OSError, KeyError, ValueError) as exc:
                    failures.append(Failure(a, f"link:{b}", str(exc)))
            if progress is not None:
                progress.update("links", i + 1, len(pairs))
        if pairs and progress is not None:
            progress.finish("links", not any(f.what.startswith("link:") for f in failures))
    finally:
        for launch in launches.values():  # launched but never awaited (interrupted)
            discard_launch(launch)
        for h in handles.values():
            try:
                stop_agent(h)
            except Exception:  # cleanup must reach every agent
                log.exception("stopping the agent of %s failed", h.device.name)
        if agents is not None:
            agents.close()
        shutil.rmtree(workdir, ignore_errors=True)
    order = {n: i for i, n in enumerate(names)}
    return Profile(
        sliced=str(sliced),
        model_name=manifest.model_name,
        manifest_sha256=sha,
        batch_sizes=opts.batch_sizes,
        devices=tuple(devices[n] for n in names if n in devices),
        blocks=tuple(sorted(blocks, key=lambda m: (order[m.device], m.block, m.batch))),
        links=tuple(sorted(links, key=lambda lk: (order[lk.src], order[lk.dst]))),
        failures=tuple(failures),
        created_at=time.time(),
        layerline_version=__version__,
    )
