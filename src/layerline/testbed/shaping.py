"""Link emulation in the namespaces: HTB for bandwidth, iptables ``statistic`` for loss, NFQUEUE for delay.

This kernel has no ``netem``: delay is a userspace delayer (:mod:`layerline.testbed.delayer`) fed by an
NFQUEUE rule on the device's ingress. Every rule lives in a namespace the testbed made, so deleting the
namespace removes it; the host's own tables are never touched.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from layerline.testbed.errors import TestbedError
from layerline.testbed.host import run_cmd
from layerline.testbed.netns import NETNS_DIR

__all__ = ["DELAY_QUEUE", "add_delay_rule", "set_loss", "set_rate", "start_delayer"]

DELAY_QUEUE = 0


def _iptables(netns: str, *args: str) -> None:
    run_cmd(["ip", "netns", "exec", netns, "iptables", "-w", "5", *args])


def set_rate(netns: str, iface: str, rate_bit: int) -> None:
    """Cap what ``iface`` sends to ``rate_bit`` bit/s with one HTB class (rate = ceil)."""
    run_cmd(
        ["tc", "-n", netns, "qdisc", "replace", "dev", iface, "root", "handle", "1:", "htb", "default", "1"]
    )
    rate = f"{rate_bit}bit"
    cls = ["tc", "-n", netns, "class", "replace", "dev", iface, "parent", "1:", "classid", "1:1"]
    run_cmd([*cls, "htb", "rate", rate, "ceil", rate])


def set_loss(netns: str, iface: str, loss: float) -> None:
    """Drop a random share ``loss`` of the packets ``iface`` receives for this namespace."""
    _iptables(
        netns,
        *("-A", "INPUT", "-i", iface, "-m", "statistic", "--mode", "random"),
        *("--probability", f"{loss:.6f}", "-j", "DROP"),
    )


def add_delay_rule(netns: str, iface: str, sources: Sequence[str] | None = None) -> None:
    """Queue the packets ``iface`` receives to the delayer (bypassed when no delayer listens): every
    packet, or only those from ``sources`` (IPv4 addresses) when given."""
    for source in sources if sources is not None else [None]:
        _iptables(
            netns,
            *("-t", "mangle", "-A", "PREROUTING", "-i", iface),
            *(("-s", f"{source}/32") if source else ()),
            *("-j", "NFQUEUE", "--queue-num", str(DELAY_QUEUE), "--queue-bypass"),
        )


def start_delayer(
    netns: str,
    delay_ms: float,
    log_path: Path,
    timeout: float = 10.0,
    by_source_ms: Mapping[str, float] | None = None,
) -> int:
    """Start the delayer inside ``netns`` as a daemon (``setsid -f``: its parent is init, so no zombie is
    left when it dies); return its pid once it is bound to the queue. ``by_source_ms`` maps IPv4 source
    addresses to their own delay (ms); other packets wait ``delay_ms``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    pairs = [f"--from={addr}={ms:g}" for addr, ms in sorted((by_source_ms or {}).items())]
    argv = [
        *("setsid", "-f", "nsenter", f"--net={NETNS_DIR / netns}", "--"),
        *(sys.executable, "-m", "layerline.testbed.delayer"),
        *("--delay-ms", f"{delay_ms:g}", "--queue", str(DELAY_QUEUE), *pairs),
    ]
    with open(log_path, "w") as log:
        subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_text()
        m = re.match(r"ready pid=(\d+)", text)
        if m:
            return int(m.group(1))
        if text.startswith("error") or "Traceback" in text:
            raise TestbedError(f"the packet delayer in {netns} failed: {text.strip()[-500:]}")
        time.sleep(0.02)
    raise TestbedError(f"the packet delayer in {netns} was not ready after {timeout:g} s; see {log_path}")
