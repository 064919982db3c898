"""The stage loop against an in-memory inbox/outbox: the interface a broker transport would implement."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from runtime_models import run, three_stage_specs

from layerline.runtime.framing import Frame, Kind, StageStatus
from layerline.runtime.inprocess import run_stage
from layerline.runtime.session import open_session
from layerline.runtime.stage_worker import StageWorker
from layerline.runtime.transport import Inbox, Outbox, Received


class MemoryInbox:
    def __init__(self) -> None:
        self.frames: asyncio.Queue = asyncio.Queue()
        self.back: list[Frame] = []

    async def start(self, on_upstream=None) -> None:
        pass

    def put(self, frame: Frame) -> None:
        now = time.monotonic()
        self.frames.put_nowait(Received(frame, now, now))

    async def receive(self) -> Received:
        return await self.frames.get()

    async def send_back(self, frame: Frame) -> None:
        self.back.append(frame)

    async def close(self) -> None:
        pass


class MemoryOutbox:
    """Records what is sent; with ``hold`` the writes stay pending (a downstream that does not read)."""

    def __init__(self, connected: bool = True, hold: bool = False) -> None:
        self.connected = connected
        self.hold = hold
        self.sent: list[Frame] = []
        self.peer = "memory"
        self.last_error = "unplugged"

    async def start(self, on_backward, on_link) -> None:
        pass

    def send(self, frame: Frame, deadline: float | None = None) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.sent.append(frame)
        if not self.hold:
            fut.set_result(0.0)
        return fut

    async def close(self) -> None:
        pass


class ThreadRecordingSession:
    """A real onnxruntime session that notes which thread ran each request."""

    def __init__(self, session) -> None:
        self.session = session
        self.threads: list[str] = []

    def get_inputs(self):
        return self.session.get_inputs()

    def get_outputs(self):
        return self.session.get_outputs()

    def run(self, names, feeds):
        self.threads.append(threading.current_thread().name)
        return self.session.run(names, feeds)


async def until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_memory_transport_satisfies_the_interface():
    assert isinstance(MemoryInbox(), Inbox) and isinstance(MemoryOutbox(), Outbox)


@pytest.mark.parametrize("inline_below_ms", [0.0, 1000.0])
def test_the_stage_loop_computes_forwards_fails_and_answers_pings(tmp_path, inline_below_ms):
    spec = three_stage_specs(tmp_path)[1]  # inputs h, x; forwards h; Reshape fails on odd batches
    session = ThreadRecordingSession(open_session(spec.model_path))
    h = np.abs(np.random.default_rng(0).standard_normal((2, 6))).astype(np.float32)
    x = np.ones((2, 6), np.float32)

    async def main():
        inbox, outbox = MemoryInbox(), MemoryOutbox()
        worker = StageWorker(spec, session, inbox, outbox, queue_size=4, inline_below_ms=inline_below_ms)
        await worker.start()
        inbox.put(Frame(Kind.DATA, 0, {"h": h, "x": x}))  # the first run always uses the compute thread
        await until(lambda: len(outbox.sent) == 1)
        inbox.put(Frame(Kind.DATA, 1, {"h": h, "x": x}, budget_ms=5000.0))
        inbox.put(Frame(Kind.DATA, 2, {"h": h[:1], "x": x[:1]}, budget_ms=5000.0))  # odd batch: fails
        inbox.put(Frame(Kind.DATA, 3, {"x": x}, budget_ms=5000.0))  # no h
        inbox.put(Frame(Kind.DATA, 4, {"h": h, "x": x}, budget_ms=-1.0))  # budget already spent
        inbox.put(Frame(Kind.PING, 5, statuses=(StageStatus(0, True, "s0"),)))
        await until(lambda: len(outbox.sent) == 3 and len(inbox.back) == 3)
        outbox.connected = False
        inbox.put(Frame(Kind.DATA, 6, {"h": h, "x": x}))
        inbox.put(Frame(Kind.PING, 7))
        await until(lambda: len(inbox.back) == 5)
        worker.stop()
        await worker.wait()
        return inbox, outbox

    inbox, outbox = run(main())
    data = next(f for f in outbox.sent if f.kind is Kind.DATA and f.request_id == 1)
    expected = run_stage(session.session, spec, {"h": h, "x": x})
    assert data.request_id == 1 and set(data.tensors) == {"y", "h"}
    np.testing.assert_array_equal(data.tensors["y"], expected["y"])
    assert [t.stage for t in data.trace] == [1] and data.trace[0].compute_ms > 0
    ping = next(f for f in outbox.sent if f.kind is Kind.PING)
    assert [s.stage for s in ping.statuses] == [0, 1] and "queue" in ping.statuses[1].detail
    errors = {f.request_id: f.error for f in inbox.back if f.kind is Kind.ERROR}
    assert errors[2].code == "compute" and errors[2].stage == 1 and "Reshape" in errors[2].message
    assert errors[3].code == "bad_request" and "['h']" in errors[3].message
    assert errors[4].code == "deadline" and "spent before it arrived" in errors[4].message
    assert (
        errors[6].code == "unavailable" and "stage 1 cannot reach its downstream memory" in errors[6].message
    )
    returned = next(f for f in inbox.back if f.kind is Kind.PING)
    assert returned.request_id == 7 and returned.error.code == "unavailable"
    # requests 0, 1 and 2 reached onnxruntime: all in the compute thread, or after the first one inline
    expected_threads = (
        ["stage1-compute"] * 3 if inline_below_ms == 0 else ["stage1-compute", "MainThread", "MainThread"]
    )
    assert session.threads == expected_threads


def test_a_downstream_that_does_not_drain_stops_the_stage_taking_work(tmp_path):
    spec = three_stage_specs(tmp_path)[1]
    session = open_session(spec.model_path)
    h = np.ones((2, 6), np.float32)

    async def main():
        inbox, outbox = MemoryInbox(), MemoryOutbox(hold=True)
        worker = StageWorker(spec, session, inbox, outbox, queue_size=2)
        await worker.start()
        for i in range(20):
            inbox.put(Frame(Kind.DATA, i, {"h": h, "x": h}))
        await asyncio.sleep(0.5)
        state = len(outbox.sent), inbox.frames.qsize()
        worker.stop()
        await worker.wait()
        return state

    sent, waiting = run(main())
    # 3 results pending downstream, 2 queued, 1 admitted and waiting for room: the rest stay in the inbox.
    assert sent == 3 and waiting == 20 - 3 - 2 - 1
