"""A small synchronous client of the gateway, on the standard library's ``urllib`` only.

Errors come back as the :class:`~layerline.errors.InferenceError` subclass that matches the HTTP status
(400/404/413 -> BadRequest, 500 -> StageFailed, 503 -> StageUnavailable, 504 -> DeadlineExceeded) with the
gateway's message; a gateway that cannot be reached raises :class:`GatewayUnreachable`.

Asynchronous requests: :meth:`GatewayClient.submit` queues one and returns its id;
:meth:`~GatewayClient.request_status`, :meth:`~GatewayClient.result`, :meth:`~GatewayClient.cancel` and
:meth:`~GatewayClient.wait` follow it (``/v1/requests``, see ``docs/http-api.md``).
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from layerline.errors import (
    BadRequest,
    DeadlineExceeded,
    FormatError,
    InferenceError,
    ProtocolError,
    StageFailed,
    StageUnavailable,
)
from layerline.serve.model_info import ModelInfo
from layerline.serve.oip import HEADER_LENGTH, decode_infer_response, encode_infer_request
from layerline.serve.validation import NPZ_MAGIC, decode_npy, decode_npz, encode_npy, encode_npz

__all__ = ["DEFAULT_URL", "GatewayClient", "GatewayUnreachable", "error_for_status"]

DEFAULT_URL = "http://127.0.0.1:8765"


class GatewayUnreachable(StageUnavailable):
    """Nothing answers at the gateway's address."""


def error_for_status(status: int, message: str) -> InferenceError:
    """The exception for an HTTP error status and the gateway's message."""
    if status == 504:
        return DeadlineExceeded(message)
    if status == 503:
        return StageUnavailable(message)
    if 400 <= status < 500:
        exc = BadRequest(message)
        exc.http_status = status
        return exc
    if status == 500:
        return StageFailed(message)
    exc2 = InferenceError(message)
    exc2.http_status = status
    return exc2


class GatewayClient:
    """Talks to one gateway. ``model`` is the served model's name; None asks the gateway once."""

    def __init__(self, url: str = DEFAULT_URL, timeout_s: float = 60.0, model: str | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            url = "http://" + url
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._model = model

    def __repr__(self) -> str:
        return f"GatewayClient({self.url!r})"

    # -- transport -------------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        accept: tuple[int, ...] = (),
    ) -> tuple[int, dict[str, str], bytes]:
        """Send one request; (status, headers, body) for 2xx and ``accept``, the mapped error otherwise."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=dict(headers or {}))
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
        except urllib.error.HTTPError as exc:
            payload = exc.read()
            if exc.code in accept:
                return exc.code, {k.lower(): v for k, v in exc.headers.items()}, payload
            raise error_for_status(exc.code, _error_message(exc.code, payload)) from None
        except TimeoutError as exc:
            raise DeadlineExceeded(f"the gateway at {self.url} did not answer within {timeout} s") from exc
        except (urllib.error.URLError, ConnectionError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, TimeoutError | socket.timeout):
                raise DeadlineExceeded(
                    f"the gateway at {self.url} did not answer within {timeout} s"
                ) from exc
            raise GatewayUnreachable(
                f"cannot connect to gateway at {self.url} ({reason}); is a deployment running? "
                "see `layerline status`"
            ) from exc

    def _json(
        self, method: str, path: str, timeout_s: float | None = None, accept: tuple[int, ...] = ()
    ) -> Any:
        _, _, body = self._request(method, path, timeout_s=timeout_s, accept=accept)
        try:
            return json.loads(body)
        except ValueError as exc:
            raise ProtocolError(f"the gateway at {self.url} answered {path} with invalid JSON") from exc

    # -- API -------------------------------------------------------------------------------------------

    @property
    def model(self) -> str:
        """The served model's name (asked of the gateway the first time)."""
        if self._model is None:
            index = self._json("POST", "/v2/repository/index")
            if not isinstance(index, list) or not index or "name" not in index[0]:
                raise ProtocolError(f"the gateway at {self.url} lists no model")
            self._model = str(index[0]["name"])
        return self._model

    def server_metadata(self) -> dict[str, Any]:
        """``GET /v2``: the server's name, version and extensions."""
        return self._json("GET", "/v2")

    def model_metadata(self) -> dict[str, Any]:
        """``GET /v2/models/{name}``: the model's inputs and outputs (OIP datatypes, -1 for dynamic dims)."""
        return self._json("GET", f"/v2/models/{self.model}")

    def model_info(self) -> ModelInfo:
        """The model's metadata as a :class:`ModelInfo` (dynamic dims as ``"?"``), e.g. for ``load_image``."""
        try:
            return ModelInfo.from_metadata(self.model_metadata())
        except FormatError as exc:
            raise ProtocolError(f"the gateway at {self.url} sent malformed model metadata: {exc}") from exc

    def health(self) -> dict[str, Any]:
        """``GET /v2/health/ready`` as a dict (``ready``, ``detail``, ``stages``), ready or not."""
        return self._json("GET", "/v2/health/ready", accept=(503,))

    def ready(self) -> bool:
        """Whether the gateway and every stage are ready; False when nothing answers."""
        try:
            self._request("GET", "/v2/health/ready", timeout_s=min(self.timeout_s, 5.0))
        except InferenceError:
            return False
        return True

    def wait_ready(self, timeout_s: float = 30.0, interval_s: float = 0.1) -> None:
        """Block until :meth:`ready`; StageUnavailable with the last reason after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.ready():
                return
            if time.monotonic() >= deadline:
                try:
                    detail = self.health().get("detail") or "not ready"
                except InferenceError as exc:
                    detail = str(exc)
                raise StageUnavailable(
                    f"the gateway at {self.url} is not ready after {timeout_s} s: {detail}"
                )
            time.sleep(interval_s)

    def predict_npy(self, array: np.ndarray) -> np.ndarray:
        """``POST /input`` with one array (single-input models); the model's first output."""
        headers = {"Content-Type": "application/octet-stream"}
        _, _, body = self._request("POST", "/input", encode_npy(np.asarray(array)), headers)
        try:
            return decode_npy(body)
        except BadRequest as exc:
            raise ProtocolError(f"the gateway at {self.url} answered with a malformed .npy: {exc}") from exc

    def predict_npz(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``POST /input`` with an .npz of named arrays; every output by name."""
        headers = {"Content-Type": "application/octet-stream"}
        _, _, body = self._request("POST", "/input", encode_npz(arrays), headers)
        try:
            return decode_npz(body, max_bytes=1 << 62)
        except BadRequest as exc:
            raise ProtocolError(f"the gateway at {self.url} answered with a malformed .npz: {exc}") from exc

    def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        binary: bool = True,
        request_id: str | None = None,
    ) -> dict[str, np.ndarray]:
        """``POST /v2/models/{name}/infer``; tensors travel as binary data unless ``binary`` is False."""
        body, header_length = encode_infer_request(
            inputs, outputs=outputs, binary=binary, request_id=request_id
        )
        headers = {
            "Content-Type": "application/octet-stream" if header_length is not None else "application/json"
        }
        if header_length is not None:
            headers[HEADER_LENGTH] = str(header_length)
        _, resp_headers, payload = self._request("POST", f"/v2/models/{self.model}/infer", body, headers)
        try:
            return decode_infer_response(payload, resp_headers.get(HEADER_LENGTH.lower()))
        except BadRequest as exc:
            raise ProtocolError(f"the gateway at {self.url} sent a malformed infer response: {exc}") from exc

    # -- asynchronous requests (/v1/requests) ---------------------------------------------------------

    def enqueue(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        binary: bool = True,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """``POST /v1/requests`` with an OIP request (as :meth:`infer` sends it); the 202 status document."""
        body, header_length = encode_infer_request(
            inputs, outputs=outputs, binary=binary, request_id=request_id
        )
        headers = {"Content-Type": "application/json"}
        if header_length is not None:
            headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(header_length)}
        _, _, payload = self._request("POST", "/v1/requests", body, headers)
        return self._document(payload, "/v1/requests")

    def submit(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        binary: bool = True,
        request_id: str | None = None,
    ) -> str:
        """Queue a request on the gateway and return its id (see :meth:`wait`)."""
        return str(self.enqueue(inputs, outputs, binary, request_id)["id"])

    def request_status(self, request_id: str, wait_s: float = 0.0) -> dict[str, Any]:
        """``GET /v1/requests/{id}``: ``status`` is queued, running, succeeded, failed, cancelled or expired.

        With ``wait_s`` > 0 the gateway answers as soon as the request ends, or after ``wait_s`` (at most 60).
        """
        path = _request_path(request_id) + (f"?wait={wait_s:g}" if wait_s > 0 else "")
        _, _, payload = self._request("GET", path, timeout_s=self.timeout_s + wait_s)
        return self._document(payload, path)

    def result(self, request_id: str) -> dict[str, np.ndarray]:
        """``GET /v1/requests/{id}/result``: the outputs by name.

        Raises what the synchronous call would have raised for a failed request (StageFailed,
        DeadlineExceeded, ...), and BadRequest with ``http_status`` 409 (not finished), 410 (cancelled or
        expired) or 404 (unknown id).
        """
        path = _request_path(request_id) + "/result"
        _, headers, payload = self._request("GET", path)
        try:
            if HEADER_LENGTH.lower() in headers or headers.get("content-type", "").startswith(
                "application/json"
            ):
                return decode_infer_response(payload, headers.get(HEADER_LENGTH.lower()))
            if payload.startswith(NPZ_MAGIC):
                return decode_npz(payload, max_bytes=1 << 62)
            array = decode_npy(payload)
        except BadRequest as exc:
            raise ProtocolError(
                f"the gateway at {self.url} sent a malformed result for {path}: {exc}"
            ) from exc
        return {self.model_info().outputs[0].name: array}

    def cancel(self, request_id: str) -> dict[str, Any]:
        """``DELETE /v1/requests/{id}``: the status document (cancelled); BadRequest 409 when already done."""
        path = _request_path(request_id)
        _, _, payload = self._request("DELETE", path)
        return self._document(payload, path)

    def wait(self, request_id: str, timeout_s: float = 60.0, poll_s: float = 5.0) -> dict[str, np.ndarray]:
        """Wait until the request ends, then :meth:`result`; DeadlineExceeded after ``timeout_s``.

        Each status call asks the gateway to hold its answer up to ``poll_s`` (a long poll), so the result
        is fetched as soon as the request ends, with one call per ``poll_s`` while it runs.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            t0 = time.monotonic()
            doc = self.request_status(request_id, wait_s=max(0.0, min(poll_s, left, 60.0)))
            status = doc.get("status")
            if status not in ("queued", "running"):
                return self.result(request_id)
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(
                    f"request {request_id} is still {status} after {timeout_s:g} s; it goes on running on "
                    "the gateway: wait for it again, or cancel it"
                )
            if time.monotonic() - t0 < 0.05:  # a gateway that does not long-poll: do not spin
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def _document(self, payload: bytes, path: str) -> dict[str, Any]:
        try:
            doc = json.loads(payload)
        except ValueError as exc:
            raise ProtocolError(f"the gateway at {self.url} answered {path} with invalid JSON") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("id"), str):
            raise ProtocolError(f"the gateway at {self.url} answered {path} without a request id")
        return doc

    def metrics(self) -> str:
        """``GET /metrics``: the Prometheus text."""
        return self._request("GET", "/metrics")[2].decode()


def _request_path(request_id: str) -> str:
    if not request_id or not isinstance(request_id, str):
        raise BadRequest(f"a request id is a non-empty string, got {request_id!r}")
    return "/v1/requests/" + urllib.parse.quote(request_id, safe="")


def _error_message(status: int, payload: bytes) -> str:
    try:
        obj = json.loads(payload)
        if isinstance(obj, dict) and isinstance(obj.get("error"), str):
            return obj["error"]
        if isinstance(obj, dict) and isinstance(obj.get("detail"), str) and obj["detail"]:
            return obj["detail"]
    except ValueError:
        pass
    text = payload.decode("utf-8", "replace").strip()
    return text or f"HTTP {status}"
