"""The gateway's asynchronous request routes: ``/v1/requests`` (submit, status, result, cancel).

``POST /v1/requests`` takes what ``POST /input`` takes (.npy/.npz) or an Open Inference Protocol request
(``Content-Type: application/json``, or any body with ``Inference-Header-Content-Length``), checks it at
once (a bad request is refused with its 4xx and nothing is queued) and answers ``202`` with the id. The
request then runs through the same ``Pipeline.infer`` and deadline as a synchronous one, in a task of the
gateway (:class:`~layerline.serve.jobs.JobStore`); its result is kept in the format of the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from aiohttp import web

from layerline.errors import BadRequest
from layerline.serve.jobs import PENDING, Job, JobResult, JobStore
from layerline.serve.oip import HEADER_LENGTH, encode_infer_response, parse_infer_request
from layerline.serve.validation import check_inputs, decode_input_body, encode_npy, encode_npz

if TYPE_CHECKING:
    from layerline.serve.app import _Gateway

__all__ = ["MAX_WAIT_S", "AsyncRequests"]

#: The longest ``GET /v1/requests/{id}?wait=S`` may hold a request open.
MAX_WAIT_S = 60.0

_OCTET = "application/octet-stream"


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class AsyncRequests:
    """The ``/v1/requests`` handlers of one gateway and its job store."""

    def __init__(self, gw: _Gateway) -> None:
        s = gw.settings
        self.gw = gw
        self.store = JobStore(
            max_pending=s.async_max_pending,
            concurrency=s.async_concurrency,
            ttl_s=s.async_result_ttl_s,
            max_bytes=s.async_max_bytes,
            metrics=gw.metrics,
        )

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/requests", self.submit)
        router.add_get("/v1/requests/{id}", self.status)
        router.add_get("/v1/requests/{id}/result", self.result)
        router.add_delete("/v1/requests/{id}", self.cancel)

    # -- POST /v1/requests ---------------------------------------------------------------------------

    async def submit(self, request: web.Request) -> web.StreamResponse:
        return await self.gw.guarded("submit", request, self._submit)

    async def _submit(self, request: web.Request) -> web.Response:
        gw, model = self.gw, self.gw.model
        body = await gw.read_body(request)
        encode: Callable[[dict[str, np.ndarray]], JobResult]
        if request.content_type == "application/json" or HEADER_LENGTH in request.headers:
            parsed = parse_infer_request(body, request.headers.get(HEADER_LENGTH), model)
            tensors = check_inputs(model, parsed.inputs)

            def encode(outputs: dict[str, np.ndarray]) -> JobResult:
                payload, header_length = encode_infer_response(model, outputs, parsed)
                if header_length is None:
                    return JobResult(payload, {"Content-Type": "application/json"})
                return JobResult(payload, {"Content-Type": _OCTET, HEADER_LENGTH: str(header_length)})

        else:
            raw, as_npz = decode_input_body(model, body, gw.settings.max_body_bytes)
            tensors = check_inputs(model, raw)

            def encode(outputs: dict[str, np.ndarray]) -> JobResult:
                if as_npz:
                    payload = encode_npz({s.name: outputs[s.name] for s in model.outputs})
                else:
                    payload = encode_npy(outputs[model.outputs[0].name])
                return JobResult(payload, {"Content-Type": _OCTET})

        del body

        async def work() -> JobResult:
            result = await gw.infer(tensors)
            return encode(result.outputs)

        job = self.store.submit(work, sum(a.nbytes for a in tensors.values()))
        return web.json_response(job.to_json(), status=202, headers={"Location": job.status_url})

    # -- GET / DELETE /v1/requests/{id} -------------------------------------------------------------

    def _job(self, request: web.Request) -> Job:
        job_id = request.match_info["id"]
        job = self.store.get(job_id)
        if job is None:
            raise _NotFound(
                f"no async request {job_id!r} on this gateway: the id is wrong, or it expired long ago, "
                "or the gateway restarted since (async requests are kept in its memory only)"
            )
        return job

    async def status(self, request: web.Request) -> web.Response:
        """The status document; ``?wait=S`` holds the answer up to S s (at most 60) until the job ends."""
        raw = request.query.get("wait", "0")
        try:
            wait_s = float(raw)
        except ValueError:
            wait_s = math.nan
        if not 0 <= wait_s <= MAX_WAIT_S:  # also refuses nan
            return _error(400, f"wait must be a number of seconds in 0..{MAX_WAIT_S:g}, got {raw!r}")
        try:
            job = self._job(request)
        except _NotFound as exc:
            return _error(404, str(exc))
        if wait_s > 0 and job.status in PENDING:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(job.done.wait(), wait_s)
        return web.json_response(job.to_json())

    async def result(self, request: web.Request) -> web.Response:
        try:
            job = self._job(request)
        except _NotFound as exc:
            return _error(404, str(exc))
        if job.status in PENDING:
            return _error(
                409,
                f"request {job.id} is {job.status}, it has no result yet; poll GET {job.status_url}"
                "?wait=30 until its status is succeeded",
            )
        if job.status == "succeeded":
            assert job.result is not None
            return web.Response(body=job.result.body, headers=job.result.headers)
        if job.status == "failed":
            return _error(job.error_status or 500, job.error or "the request failed")
        if job.status == "cancelled":
            return _error(410, f"request {job.id} was cancelled ({job.error}); it has no result")
        return _error(410, f"the result of request {job.id} is gone: {job.error}")

    async def cancel(self, request: web.Request) -> web.Response:
        try:
            job = self._job(request)
        except _NotFound as exc:
            return _error(404, str(exc))
        if job.status == "cancelled" or self.store.cancel(job):
            return web.json_response(job.to_json())
        return _error(
            409, f"request {job.id} already {job.status}; only a queued or running request can be cancelled"
        )


class _NotFound(BadRequest):
    http_status = 404
