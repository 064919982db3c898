"""The HTTP gateway: an aiohttp app that runs requests through a :class:`~layerline.runtime.api.Pipeline`.

Endpoints (see ``docs/http-api.md``): ``POST /input`` (.npy/.npz in and out), the Open Inference Protocol v2
REST endpoints under ``/v2`` (JSON and the binary tensor data extension), asynchronous requests under
``/v1/requests`` (:mod:`layerline.serve.async_api`) and ``GET /metrics``.

[Note: request accounting] Only the inference endpoints (``/input`` and ``.../infer``) are counted in
``layerline_requests_total`` and the in-flight limit; health and metadata probes would drown the counts.
A request over ``max_in_flight`` is refused at once with 503 rather than queued: bodies held in a queue
cost memory, and a client retrying is better placed to back off than a gateway holding its sockets.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import numpy as np
from aiohttp import web

import layerline
from layerline.errors import (
    BadRequest,
    DeadlineExceeded,
    EngineError,
    InferenceError,
    LayerlineError,
    StageFailed,
    StageUnavailable,
)
from layerline.runtime.api import InferResult, Pipeline, PipelineHealth
from layerline.serve.async_api import AsyncRequests
from layerline.serve.jobs import StoreFull
from layerline.serve.metrics import CONTENT_TYPE, GatewayMetrics
from layerline.serve.model_info import ModelInfo
from layerline.serve.oip import HEADER_LENGTH, encode_infer_response, parse_infer_request
from layerline.serve.validation import (
    PayloadTooLarge,
    check_inputs,
    decode_input_body,
    encode_npy,
    encode_npz,
)

__all__ = [
    "GatewaySettings",
    "ModelNotFound",
    "Overloaded",
    "bind_socket",
    "create_app",
    "outcome_of",
    "run_gateway",
    "serve_app",
]

log = logging.getLogger(__name__)

#: Extra time the gateway gives a pipeline past ``request_timeout_s`` before it gives up on it itself.
_DEADLINE_GRACE_S = 1.0


@dataclass(frozen=True)
class GatewaySettings:
    """How the gateway listens and what it accepts.

    ``health_timeout_s`` bounds one readiness probe of the pipeline; its answer is reused for
    ``health_cache_s`` so that a flood of ``/v2/health/ready`` calls does not flood the stage chain.
    The ``async_*`` fields bound the store of ``/v1/requests`` (see :mod:`layerline.serve.jobs`): requests
    queued or running, how many run at once, how long finished ones are kept, and the bytes of inputs and
    results held.
    """

    host: str = "127.0.0.1"
    port: int = 8765
    max_body_bytes: int = 64 * 1024 * 1024
    request_timeout_s: float = 30.0
    health_timeout_s: float = 2.0
    health_cache_s: float = 0.5
    #: A request still running after this long makes the gateway probe the chain (every ``watch_after_s``);
    #: when the probe says a stage is gone (its node cut off, a frozen worker) the request fails at once with
    #: 503 instead of waiting for its deadline. 0 turns the watch off.
    watch_after_s: float = 1.0
    max_in_flight: int = 64
    async_max_pending: int = 256
    async_concurrency: int = 8
    async_result_ttl_s: float = 600.0
    async_max_bytes: int = 512 * 1024 * 1024

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        for name in ("request_timeout_s", "health_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.health_cache_s < 0:
            raise ValueError(f"health_cache_s must be >= 0, got {self.health_cache_s}")
        if self.watch_after_s < 0:
            raise ValueError(f"watch_after_s must be >= 0, got {self.watch_after_s}")
        for name in ("max_in_flight", "async_max_pending", "async_concurrency", "async_max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.async_result_ttl_s > 0:
            raise ValueError(f"async_result_ttl_s must be > 0, got {self.async_result_ttl_s}")


class ModelNotFound(BadRequest):
    """The URL names a model (or version) this gateway does not serve (HTTP 404)."""

    http_status = 404


class Overloaded(StageUnavailable):
    """The gateway already handles ``max_in_flight`` requests (HTTP 503)."""


def outcome_of(exc: BaseException) -> str:
    """The ``outcome`` label of a failed request."""
    for cls, outcome in (
        (PayloadTooLarge, "too_large"),
        (ModelNotFound, "not_found"),
        (BadRequest, "bad_request"),
        (Overloaded, "overloaded"),
        (StoreFull, "overloaded"),
        (StageUnavailable, "unavailable"),
        (DeadlineExceeded, "deadline"),
        (StageFailed, "stage_failed"),
    ):
        if isinstance(exc, cls):
            return outcome
    return "error"


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class _Readiness:
    """The pipeline's health, probed at most once per ``ttl_s`` however many callers ask."""

    def __init__(self, pipeline: Pipeline, timeout_s: float, ttl_s: float) -> None:
        self._pipeline, self._timeout, self._ttl = pipeline, timeout_s, ttl_s
        self._lock = asyncio.Lock()
        self._value: PipelineHealth | None = None
        self._at = 0.0
        self.closing = False

    async def get(self) -> PipelineHealth:
        if self.closing:
            return PipelineHealth(False, detail="the gateway is shutting down")
        async with self._lock:
            if self._value is not None and time.monotonic() - self._at < self._ttl:
                return self._value
            try:
                grace = min(0.5, self._timeout)  # the pipeline should answer in time; allow a little more
                value = await asyncio.wait_for(self._pipeline.health(self._timeout), self._timeout + grace)
            except asyncio.TimeoutError:
                value = PipelineHealth(False, detail=f"health probe did not answer within {self._timeout} s")
            except Exception as exc:
                value = PipelineHealth(False, detail=f"health probe failed: {exc}")
            self._value, self._at = value, time.monotonic()
            return value

    def invalidate(self) -> None:
        """Forget the cached answer: a request just found a stage unreachable, so probe again."""
        self._value = None

    def recent_failure(self) -> PipelineHealth | None:
        """The cached answer when it is a "not ready" younger than the cache time (else None)."""
        value = self._value
        if value is not None and not value.ready and time.monotonic() - self._at < self._ttl:
            return value
        return None


def _health_json(health: PipelineHealth) -> dict:
    return {
        "ready": health.ready,
        "detail": health.detail,
        "stages": [{"stage": s.stage, "ready": s.ready, "detail": s.detail} for s in health.stages],
    }


class _Gateway:
    """The handlers of one app and the state they share."""

    def __init__(self, pipeline: Pipeline, model: ModelInfo, settings: GatewaySettings) -> None:
        self.pipeline, self.model, self.settings = pipeline, model, settings
        self.metrics = GatewayMetrics()
        self.readiness = _Readiness(pipeline, settings.health_timeout_s, settings.health_cache_s)
        self.in_flight = 0
        self.async_requests = AsyncRequests(self)

    # -- plumbing ------------------------------------------------------------------------------------

    async def read_body(self, request: web.Request) -> bytes:
        limit = self.settings.max_body_bytes
        too_large = (
            f"the request body is larger than the gateway's limit of {limit} bytes; "
            "send fewer items per request or start the gateway with a larger --max-body-bytes"
        )
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(too_large)
        chunks, total = [], 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
            if total > limit:
                raise PayloadTooLarge(too_large)
            chunks.append(chunk)
        return b"".join(chunks)

    def check_model(self, request: web.Request) -> None:
        name = request.match_info["name"]
        if name != self.model.name:
            raise ModelNotFound(f"unknown model '{name}'; this gateway serves '{self.model.name}'")
        version = request.match_info.get("version")
        if version is not None and version != self.model.version:
            raise ModelNotFound(
                f"unknown version '{version}' of model '{name}'; this gateway serves version "
                f"'{self.model.version}'"
            )

    async def infer(self, inputs: dict[str, np.ndarray]) -> InferResult:
        timeout = self.settings.request_timeout_s
        known = self.readiness.recent_failure()
        if known is not None:
            raise StageUnavailable(f"the pipeline is not ready: {known.detail}")
        run = asyncio.ensure_future(
            asyncio.wait_for(self.pipeline.infer(inputs, timeout), timeout + _DEADLINE_GRACE_S)
        )
        try:
            result = await self._watched(run)
        except asyncio.TimeoutError:
            self.readiness.invalidate()
            raise DeadlineExceeded(f"the request did not complete within {timeout} s") from None
        except (StageUnavailable, DeadlineExceeded):
            self.readiness.invalidate()
            raise
        finally:
            if not run.done():
                run.cancel()
        missing = [s.name for s in self.model.outputs if s.name not in result.outputs]
        if missing:
            raise StageFailed(
                f"the pipeline returned no output {', '.join(repr(m) for m in missing)}; "
                "the deployment does not match the model it claims to serve"
            )
        self.metrics.observe_result(result)
        return result

    async def _watched(self, run: asyncio.Future) -> InferResult:
        """``run``'s result; while it runs past ``watch_after_s``, probe the chain and give up with 503 when
        the probe says it is broken (a lost node never answers, so the deadline alone would be the only
        way out)."""
        every = self.settings.watch_after_s
        if every <= 0:
            return await run
        while True:
            done, _ = await asyncio.wait({run}, timeout=every)
            if done:
                return run.result()
            probe = asyncio.ensure_future(self.readiness.get())
            done, _ = await asyncio.wait({run, probe}, return_when=asyncio.FIRST_COMPLETED)
            if run in done:
                probe.cancel()
                return run.result()
            health = probe.result()
            if not health.ready and not run.done():
                run.cancel()
                raise StageUnavailable(
                    f"the request was still running after {every:g} s and the pipeline is not ready: "
                    f"{health.detail}"
                )

    async def guarded(
        self,
        endpoint: str,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """Run an inference handler with the in-flight limit, error mapping, counting and timing."""
        t0 = time.perf_counter()
        if self.in_flight >= self.settings.max_in_flight:
            exc: InferenceError = Overloaded(
                f"the gateway already handles {self.in_flight} requests (max_in_flight="
                f"{self.settings.max_in_flight}); retry later or raise --max-in-flight"
            )
            self.metrics.count(endpoint, "overloaded", time.perf_counter() - t0)
            response = _error(exc.http_status, str(exc))
            response.headers["Retry-After"] = "1"
            return response
        self.in_flight += 1
        self.metrics.in_flight.inc()
        outcome = "ok"
        try:
            response = await handler(request)
        except InferenceError as exc:
            outcome = outcome_of(exc)
            response = _error(exc.http_status, str(exc))
            if isinstance(exc, PayloadTooLarge):
                response.force_close()
            if isinstance(exc, Overloaded | StoreFull):
                response.headers["Retry-After"] = "1"
        except Exception as exc:
            log.exception("%s %s failed in the gateway", request.method, request.path)
            outcome = "error"
            response = _error(500, f"internal error in the gateway: {type(exc).__name__}: {exc}")
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()
        elapsed = time.perf_counter() - t0
        self.metrics.count(endpoint, outcome, elapsed)
        log.debug(
            "%s %s -> %d %s in %.2f ms", request.method, request.path, response.status, outcome, elapsed * 1e3
        )
        return response

    # -- /input --------------------------------------------------------------------------------------

    async def post_input(self, request: web.Request) -> web.StreamResponse:
        return await self.guarded("input", request, self._input)

    async def _input(self, request: web.Request) -> web.Response:
        body = await self.read_body(request)
        tensors, as_npz = decode_input_body(self.model, body, self.settings.max_body_bytes)
        result = await self.infer(check_inputs(self.model, tensors))
        if as_npz:
            payload = encode_npz({s.name: result.outputs[s.name] for s in self.model.outputs})
        else:
            payload = encode_npy(result.outputs[self.model.outputs[0].name])
        return web.Response(body=payload, content_type="application/octet-stream")

    # -- Open Inference Protocol v2 ----------------------------------------------------------------

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"name": "layerline", "version": layerline.__version__, "extensions": ["binary_tensor_data"]}
        )

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        health = await self.readiness.get()
        return web.json_response(_health_json(health), status=200 if health.ready else 503)

    async def model_metadata(self, request: web.Request) -> web.Response:
        try:
            self.check_model(request)
        except ModelNotFound as exc:
            return _error(404, str(exc))
        return web.json_response(self.model.metadata())

    async def model_ready(self, request: web.Request) -> web.Response:
        try:
            self.check_model(request)
        except ModelNotFound as exc:
            return _error(404, str(exc))
        health = await self.readiness.get()
        body = {"name": self.model.name, **_health_json(health)}
        return web.json_response(body, status=200 if health.ready else 503)

    async def repository_index(self, request: web.Request) -> web.Response:
        health = await self.readiness.get()
        state = "READY" if health.ready else "UNAVAILABLE"
        return web.json_response([{"name": self.model.name, "version": self.model.version, "state": state}])

    async def post_infer(self, request: web.Request) -> web.StreamResponse:
        return await self.guarded("infer", request, self._infer_oip)

    async def _infer_oip(self, request: web.Request) -> web.Response:
        self.check_model(request)
        body = await self.read_body(request)
        parsed = parse_infer_request(body, request.headers.get(HEADER_LENGTH), self.model)
        result = await self.infer(check_inputs(self.model, parsed.inputs))
        payload, header_length = encode_infer_response(self.model, result.outputs, parsed)
        if header_length is None:
            return web.Response(body=payload, content_type="application/json")
        return web.Response(
            body=payload,
            content_type="application/octet-stream",
            headers={HEADER_LENGTH: str(header_length)},
        )

    # -- metrics ---------------------------------------------------------------------------------------

    async def get_metrics(self, request: web.Request) -> web.Response:
        self.async_requests.store.sweep()
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


@web.middleware
async def _json_errors(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Answer aiohttp's own errors (unknown route, wrong method) with the OIP error JSON."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _error(exc.status, f"{exc.status} {exc.reason}: {request.method} {request.path}")
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response


GATEWAY_KEY = web.AppKey("layerline_gateway", _Gateway)


def create_app(
    pipeline: Pipeline, model: ModelInfo, settings: GatewaySettings | None = None
) -> web.Application:
    """The gateway app; it starts ``pipeline`` on startup and closes it on cleanup."""
    settings = settings or GatewaySettings()
    gw = _Gateway(pipeline, model, settings)
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[_json_errors])
    app[GATEWAY_KEY] = gw

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await pipeline.start()
        yield
        await pipeline.close()

    async def on_shutdown(app: web.Application) -> None:
        gw.readiness.closing = True
        await gw.async_requests.store.close()  # ends long polls too; async ids do not survive a restart

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(on_shutdown)
    model_routes = ("/v2/models/{name}", "/v2/models/{name}/versions/{version}")
    app.router.add_post("/input", gw.post_input)
    app.router.add_get("/v2", gw.server_metadata)
    app.router.add_get("/v2/health/live", gw.live)
    app.router.add_get("/v2/health/ready", gw.ready)
    app.router.add_post("/v2/repository/index", gw.repository_index)
    for base in model_routes:
        app.router.add_get(base, gw.model_metadata)
        app.router.add_get(base + "/ready", gw.model_ready)
        app.router.add_post(base + "/infer", gw.post_infer)
    app.router.add_get("/metrics", gw.get_metrics)
    gw.async_requests.add_routes(app.router)
    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; EngineError naming the fix when it cannot be had."""
    try:
        return socket.create_server((host, port), reuse_port=False)
    except socket.gaierror as exc:
        raise EngineError(f"cannot resolve host {host!r} ({exc}); pass --host 127.0.0.1 or 0.0.0.0") from exc
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise EngineError(f"port {port} is in use by another process; pass --port") from exc
        if exc.errno == errno.EACCES:
            raise EngineError(f"no permission to listen on port {port}; pass a --port above 1023") from exc
        if exc.errno == errno.EADDRNOTAVAIL:
            raise EngineError(f"{host} is not an address of this machine; pass --host 127.0.0.1") from exc
        raise EngineError(f"cannot listen on {host}:{port}: {exc}") from exc


async def serve_app(app: web.Application, sock: socket.socket, stop: asyncio.Event) -> None:
    """Serve ``app`` on ``sock`` until ``stop`` is set; then drain in-flight requests and clean up."""
    gw = app[GATEWAY_KEY]
    runner = web.AppRunner(
        app, handle_signals=False, shutdown_timeout=gw.settings.request_timeout_s + _DEADLINE_GRACE_S
    )
    try:
        await runner.setup()
    except LayerlineError:
        raise
    except Exception as exc:
        raise EngineError(f"the gateway could not start its pipeline: {type(exc).__name__}: {exc}") from exc
    try:
        site = web.SockSite(runner, sock)
        await site.start()
        host, port = sock.getsockname()[:2]
        log.info("gateway for model %r listening on http://%s:%d", gw.model.name, host, port)
        await stop.wait()
        # [Note: draining] aiohttp's own shutdown ignores bytes that arrive after it starts, so a request
        # still uploading its body would hang until the shutdown timeout. Stop accepting connections, say
        # "not ready", and let the in-flight requests finish before handing over to runner.cleanup().
        gw.readiness.closing = True
        await site.stop()
        log.info("gateway stopping: finishing %d in-flight requests", gw.in_flight)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + gw.settings.request_timeout_s + _DEADLINE_GRACE_S
        while gw.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.01)
    finally:
        await runner.cleanup()
    log.info("gateway stopped")


def run_gateway(pipeline: Pipeline, model: ModelInfo, settings: GatewaySettings | None = None) -> None:
    """Bind, start the pipeline and serve until SIGTERM or SIGINT; then stop gracefully. Blocks."""
    settings = settings or GatewaySettings()
    sock = bind_socket(settings.host, settings.port)
    app = create_app(pipeline, model, settings)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or Windows
                log.debug("cannot handle signal %s here", sig)
        await serve_app(app, sock, stop)

    try:
        asyncio.run(main())
    finally:
        sock.close()
