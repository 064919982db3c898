"""A packet delay without ``netem`` (absent from this kernel): an NFQUEUE listener in Python.

An iptables rule in the device's namespace (mangle PREROUTING, ``-j NFQUEUE --queue-bypass``) hands every
received packet to the kernel's queue; this process, started inside the same namespace, learns each
packet's id and gives the verdict ACCEPT ``delay`` later. With one delay for every packet only metadata is
copied (the payload stays in the kernel) and verdicts go out in arrival order, one batch verdict per
wake-up. With per-sender delays (``--from 10.213.0.11=30``) the kernel copies the first 20 bytes of each
packet, the IPv4 header, whose source address picks the delay; packets of one delay still leave in arrival
order, and one wake-up sends a batch verdict when that releases a prefix of the queue, else one verdict
per packet (all in one netlink write). Delaying on ingress rather than egress matters: on egress TCP small
queues would throttle the sender.

Run: ``python -m layerline.testbed.delayer --delay-ms 10 [--from ADDR=MS ...]`` (inside the namespace).
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
from collections.abc import Iterator, Mapping, Sequence

__all__ = ["DelayTable", "NfQueue", "main", "run_delayer"]

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
SO_RCVBUFFORCE = 33
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 1, 2, 3
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQA_PACKET_HDR, NFQA_VERDICT_HDR, NFQA_PAYLOAD = 1, 2, 10
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META, NFQNL_COPY_PACKET = 1, 2
IPV4_HEADER = 20  # bytes copied per packet when the delay depends on the sender
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


class DelayTable:
    """The delay (seconds) of a packet: by its IPv4 source address, else the default."""

    def __init__(self, default_ms: float, by_source_ms: Mapping[str, float] | None = None) -> None:
        self.default = default_ms / 1000.0
        self.by_source = {socket.inet_aton(a): ms / 1000.0 for a, ms in (by_source_ms or {}).items()}

    def delay(self, header: bytes | memoryview | None) -> float:
        """``header``: the packet's first bytes (its IP header), or None when not copied."""
        if not self.by_source or header is None or len(header) < IPV4_HEADER or header[0] >> 4 != 4:
            return self.default
        return self.by_source.get(bytes(header[12:16]), self.default)


class NfQueue:
    """One bound NFQUEUE queue on a netlink socket (fail-open, GSO packets whole); copies only metadata,
    or the first ``copy_bytes`` of each packet when that is above 0."""

    def __init__(self, queue: int = 0, maxlen: int = 8192, copy_bytes: int = 0) -> None:
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
        mode = NFQNL_COPY_PACKET if copy_bytes > 0 else NFQNL_COPY_META
        self._configure([_attr(NFQA_CFG_PARAMS, struct.pack("!IB", copy_bytes, mode))])
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
        for pid, _ in self.packets():
            yield pid

    def packets(self) -> Iterator[tuple[int, bytes | None]]:
        """(id, first bytes of the packet or None) of the packets queued since the last call."""
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
                    pid, head = self._parse_packet(view, off + NLMSG_HDR.size + NFGEN_HDR.size, off + length)
                    if pid is not None:
                        yield pid, head
                off += (length + 3) & ~3

    @staticmethod
    def _parse_packet(view: memoryview, off: int, end: int) -> tuple[int | None, bytes | None]:
        pid, head = None, None
        while off + NLA_HDR.size <= end:
            size, kind = NLA_HDR.unpack_from(view, off)
            if size < NLA_HDR.size:
                break
            if kind & 0x7FFF == NFQA_PACKET_HDR:
                pid = struct.unpack_from("!I", view, off + NLA_HDR.size)[0]
            elif kind & 0x7FFF == NFQA_PAYLOAD:
                head = bytes(view[off + NLA_HDR.size : off + size])
            off += (size + 3) & ~3
        return pid, head

    def accept_through(self, packet_id: int) -> None:
        """ACCEPT every queued packet whose id is at most ``packet_id``."""
        verdict = _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id))
        self.sock.send(self._message(NFQNL_MSG_VERDICT_BATCH, [verdict]))

    def accept(self, packet_ids: Sequence[int]) -> None:
        """ACCEPT exactly these packets: one verdict message each, many messages per netlink write."""
        msgs = [
            self._message(NFQNL_MSG_VERDICT, [_attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, pid))])
            for pid in packet_ids
        ]
        for i in range(0, len(msgs), 512):
            self.sock.send(b"".join(msgs[i : i + 512]))


def run_delayer(delay_ms: float, queue: int = 0, by_source_ms: Mapping[str, float] | None = None) -> None:
    """Hold every packet of ``queue`` for ``delay_ms`` milliseconds, or for ``by_source_ms[source]`` when
    its IPv4 source address is listed there; runs until SIGTERM/SIGINT."""
    table = DelayTable(delay_ms, by_source_ms)
    nfq = NfQueue(queue, copy_bytes=IPV4_HEADER if table.by_source else 0)
    # one FIFO per delay: packets of one delay are released in arrival order
    waiting: dict[float, collections.deque[tuple[float, int]]] = {}  # delay -> (release time, packet id)
    poller = select.poll()
    poller.register(nfq.fileno(), select.POLLIN)
    pairs = " ".join(f"{a}={ms:g}" for a, ms in (by_source_ms or {}).items())
    print(f"ready pid={os.getpid()} queue={queue} delay_ms={delay_ms:g} from={pairs or '-'}", flush=True)
    while True:
        heads = [q[0][0] for q in waiting.values() if q]
        timeout_ms = None if not heads else max(0.0, (min(heads) - time.monotonic()) * 1000.0)
        if poller.poll(timeout_ms):
            now = time.monotonic()
            for pid, head in nfq.packets():
                delay = table.delay(head)
                waiting.setdefault(delay, collections.deque()).append((now + delay, pid))
        _release(nfq, waiting, time.monotonic() + 50e-6)


def _release(nfq: NfQueue, waiting: dict[float, collections.deque[tuple[float, int]]], now: float) -> None:
    due: list[int] = []
    for q in waiting.values():
        while q and q[0][0] <= now:
            due.append(q.popleft()[1])
    if not due:
        return
    left = [q[0][1] for q in waiting.values() if q]
    if not left or max(due) < min(left):
        nfq.accept_through(max(due))  # every packet up to there is due: one batch verdict
    else:
        nfq.accept(due)


def _pair(text: str) -> tuple[str, float]:
    addr, _, ms = text.partition("=")
    try:
        socket.inet_aton(addr)
        return addr, float(ms)
    except (OSError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not ADDR=MS (e.g. 10.213.0.11=30)") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m layerline.testbed.delayer", description=__doc__)
    parser.add_argument("--delay-ms", type=float, required=True, help="delay of packets from other senders")
    parser.add_argument("--queue", type=int, default=0)
    parser.add_argument(
        "--from",
        dest="pairs",
        type=_pair,
        action="append",
        default=[],
        metavar="ADDR=MS",
        help="delay of packets whose IPv4 source is ADDR (repeat for more senders)",
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        run_delayer(args.delay_ms, args.queue, dict(args.pairs))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"error: {exc}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
