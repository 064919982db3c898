"""A constant packet delay without ``netem`` (absent from this kernel): an NFQUEUE listener in Python.

An iptables rule in the device's namespace (mangle PREROUTING, ``-j NFQUEUE --queue-bypass``) hands every
received packet to the kernel's queue; this process, started inside the same namespace, learns each
packet's id (metadata only, the payload stays in the kernel) and gives the verdict ACCEPT ``delay`` later.
All packets wait the same time, so verdicts go out in arrival order, one batch verdict per wake-up.
Delaying on ingress rather than egress matters: on egress TCP small queues would throttle the sender.

Run: ``python -m layerline.testbed.delayer --delay-ms 10`` (inside the namespace).
Prints ``ready pid=PID`` once bound.
"""

from __future__ import annotations

import argparse
import collections
import os
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterator, Sequence

__all__ = ["NfQueue", "main", "run_delayer"]

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
SO_RCVBUFFORCE = 33
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 2, 3
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_CFG_F_FAIL_OPEN, NFQA_CFG_F_GSO = 0x1, 0x4
NF_ACCEPT = 1
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR = 2
NLMSG_HDR = struct.Struct("=IHHII")  # length, type, flags, seq, port id (host order)
NFGEN_HDR = struct.Struct("!BBH")  # family, version, resource id = queue number (network order)
NLA_HDR = struct.Struct("=HH")


def _attr(kind: int, payload: bytes) -> bytes:
    size = NLA_HDR.size + len(payload)
    return NLA_HDR.pack(size, kind) + payload + bytes((4 - size % 4) % 4)


class NfQueue:
    """One bound NFQUEUE queue on a netlink socket (metadata copy mode, fail-open, GSO packets whole)."""

    def __init__(self, queue: int = 0, maxlen: int = 8192) -> None:
        self.queue = queue
        self._seq = 0
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        self._configure([_attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0))])
        self._configure([_attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))])
        self._configure([_attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", maxlen))])
        flags = struct.pack("!I", NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO)
        self._configure([_attr(NFQA_CFG_FLAGS, flags), _attr(NFQA_CFG_MASK, flags)])
        self.sock.setblocking(False)
        self._buf = bytearray(1 << 20)

    def _message(self, msg_type: int, attrs: Sequence[bytes], flags: int = NLM_F_REQUEST) -> bytes:
        self._seq += 1
        body = NFGEN_HDR.pack(socket.AF_UNSPEC, 0, self.queue) + b"".join(attrs)
        kind = (NFNL_SUBSYS_QUEUE << 8) | msg_type
        return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), kind, flags, self._seq, 0) + body

    def _configure(self, attrs: Sequence[bytes]) -> None:
        self.sock.send(self._message(NFQNL_MSG_CONFIG, attrs, NLM_F_REQUEST | NLM_F_ACK))
        reply = self.sock.recv(65536)
        _, kind, _, _, _ = NLMSG_HDR.unpack_from(reply, 0)
        if kind == NLMSG_ERROR:
            (errno,) = struct.unpack_from("=i", reply, NLMSG_HDR.size)
            if errno:
                raise OSError(-errno, f"NFQUEUE {self.queue}: configuration refused by the kernel")

    def fileno(self) -> int:
        return self.sock.fileno()

    def packet_ids(self) -> Iterator[int]:
        """Ids of the packets queued since the last call (non-blocking)."""
        packet_type = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET
        view = memoryview(self._buf)
        while True:
            try:
                n = self.sock.recv_into(self._buf)
            except BlockingIOError:
                return
            off = 0
            while off + NLMSG_HDR.size <= n:
                length, kind, _, _, _ = NLMSG_HDR.unpack_from(view, off)
                if length < NLMSG_HDR.size:
                    break
                if kind == packet_type:
                    pid = self._packet_id(view, off + NLMSG_HDR.size + NFGEN_HDR.size, off + length)
                    if pid is not None:
                        yield pid
                off += (length + 3) & ~3

    @staticmethod
    def _packet_id(view: memoryview, off: int, end: int) -> int | None:
        while off + NLA_HDR.size <= end:
            size, kind = NLA_HDR.unpack_from(view, off)
            if size < NLA_HDR.size:
                return None
            if kind & 0x7FFF == NFQA_PACKET_HDR:
                return struct.unpack_from("!I", view, off + NLA_HDR.size)[0]
            off += (size + 3) & ~3
        return None

    def accept_through(self, packet_id: int) -> None:
        """ACCEPT every queued packet whose id is at most ``packet_id``."""
        verdict = _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id))
        self.sock.send(self._message(NFQNL_MSG_VERDICT_BATCH, [verdict]))


def run_delayer(delay_ms: float, queue: int = 0) -> None:
    """Hold every packet of ``queue`` for ``delay_ms`` milliseconds; runs until SIGTERM/SIGINT."""
    nfq = NfQueue(queue)
    delay = delay_ms / 1000.0
    waiting: collections.deque[tuple[float, int]] = collections.deque()  # (release time, packet id)
    poller = select.poll()
    poller.register(nfq.fileno(), select.POLLIN)
    print(f"ready pid={os.getpid()} queue={queue} delay_ms={delay_ms:g}", flush=True)
    while True:
        timeout_ms = None if not waiting else max(0.0, (waiting[0][0] - time.monotonic()) * 1000.0)
        if poller.poll(timeout_ms):
            due = time.monotonic() + delay
            waiting.extend((due, pid) for pid in nfq.packet_ids())
        now = time.monotonic() + 50e-6
        last = None
        while waiting and waiting[0][0] <= now:
            last = waiting.popleft()[1]
        if last is not None:
            nfq.accept_through(last)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m layerline.testbed.delayer", description=__doc__)
    parser.add_argument("--delay-ms", type=float, required=True)
    parser.add_argument("--queue", type=int, default=0)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        run_delayer(args.delay_ms, args.queue)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"error: {exc}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
