"""``layerline testbed up|status|exec|docker|down``: an emulated fleet of devices on this host (root)."""

from __future__ import annotations

import argparse
import os

from rich.table import Table

from layerline.cli.output import console, human_bytes, print_json

__all__ = ["register"]

EPILOG = """\
examples:
  sudo layerline testbed up examples/fleets/pis.yaml     three Pis on a 100 Mbit/10 ms link
  sudo layerline testbed status                          devices, addresses, limits, daemons
  sudo layerline testbed exec pi1 -- ip addr             run a command inside a device
  sudo layerline testbed up examples/fleets/swarm-trio.yaml   three devices, one dockerd each, one swarm
  sudo layerline testbed docker node1 -- node ls         the docker CLI against a device's dockerd
  sudo layerline testbed down                            remove everything the testbed created
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "testbed",
        help="emulate a fleet of devices on this host (namespaces, shaped links, CPU/memory limits)",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tsub = p.add_subparsers(dest="testbed_command", metavar="SUBCOMMAND")
    tsub.required = True
    u = tsub.add_parser("up", help="create the devices of a fleet file")
    u.add_argument("fleet", help="fleet YAML file (see examples/fleets/)")
    u.set_defaults(func=run_up)
    s = tsub.add_parser("status", help="devices, addresses, limits, daemons")
    s.add_argument("--json", action="store_true", help="print one JSON document")
    s.set_defaults(func=run_status)
    e = tsub.add_parser("exec", help="run a command inside a device (its cgroups and network namespace)")
    e.add_argument("device")
    e.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    e.set_defaults(func=run_exec)
    k = tsub.add_parser("docker", help="run the docker CLI against a swarm: true device's dockerd")
    k.add_argument("device")
    k.add_argument("cmd", nargs=argparse.REMAINDER, help="-- DOCKER ARGS... (e.g. -- node ls)")
    k.set_defaults(func=run_docker)
    d = tsub.add_parser("down", help="remove everything the testbed created (safe to repeat)")
    d.set_defaults(func=run_down)


def run_up(args: argparse.Namespace) -> int:
    from layerline.testbed import load_fleet, status, up

    state = up(load_fleet(args.fleet))
    console.print(f"testbed [bold]{state.testbed_id}[/] up: {len(state.devices)} devices on {state.subnet}")
    current = status()
    if current is not None:
        _print_status(current)
    return 0


def _daemon_cell(pid: int | None, running: bool | None) -> str:
    if running is None:
        return "-"
    return f"{pid or '?'} " + ("ok" if running else "DEAD")


def _print_status(st) -> None:
    table = Table()
    for col in ("device", "address", "netns", "cpu", "memory", "used", "link", "procs", "delayer"):
        table.add_column(col)
    for d in st.devices:
        table.add_row(
            d.name,
            d.address,
            d.netns + ("" if d.netns_present else " (MISSING)"),
            "?" if d.cpu_limit is None else f"{d.cpu_limit:g}",
            human_bytes(d.memory_limit),
            human_bytes(d.memory_usage),
            d.link,
            str(d.processes),
            _daemon_cell(d.delayer_pid, d.delayer_running),
        )
    console.print(table)
    daemons = [d for d in st.devices if d.docker_host]
    if not daemons:
        return
    swarm = Table(title="swarm (manager first)")
    for col in ("device", "dockerd", "node", "DOCKER_HOST"):
        swarm.add_column(col, overflow="fold")
    for d in daemons:
        node = " ".join(x for x in (d.node_state, d.node_availability, d.node_role) if x) or "?"
        swarm.add_row(d.name, _daemon_cell(d.dockerd_pid, d.dockerd_running), node, d.docker_host)
    console.print(swarm)


def run_status(args: argparse.Namespace) -> int:
    from layerline.testbed import status

    st = status()
    if args.json:
        print_json(st.to_json() if st else None)
    elif st is None:
        console.print("no testbed is up; start one with `layerline testbed up FLEET.yaml`")
    else:
        health = "[green]healthy[/]" if st.healthy else "[red]degraded[/] (run `layerline testbed down`)"
        console.print(
            f"testbed [bold]{st.state.testbed_id}[/]  fleet={st.state.fleet.name}  {st.state.phase}  {health}"
        )
        _print_status(st)
    return 0 if st is None or st.healthy else 1


def run_exec(args: argparse.Namespace) -> int:
    from layerline.testbed import TestbedError, device_argv, load_state

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    state = load_state()
    if state is None:
        raise TestbedError("no testbed is up; start one with `layerline testbed up FLEET.yaml`")
    argv = device_argv(state, args.device, cmd)
    os.execvp(argv[0], argv)
    return 1  # not reached


def run_docker(args: argparse.Namespace) -> int:
    import shutil

    from layerline.testbed import TestbedError, docker_host, load_state

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    state = load_state()
    if state is None:
        raise TestbedError("no testbed is up; start one with `layerline testbed up FLEET.yaml`")
    host = docker_host(state, args.device)
    binary = shutil.which("docker")
    if binary is None:
        raise TestbedError("the docker command is not installed; apt-get install -y docker.io")
    os.execv(binary, [binary, "-H", host, *cmd])
    return 1  # not reached


def run_down(args: argparse.Namespace) -> int:
    from layerline.testbed import down

    removed = down()
    console.print(f"removed {len(removed)} testbed resources" if removed else "no testbed was up")
    return 0
