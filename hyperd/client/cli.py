"""``hyperctl``: hyperd's command-line client, printing what the original hyperctl printed.

Each command is an ``async def cmd_<name>(client, args, out)`` registered in :data:`COMMANDS` together with
the function that adds its arguments; adding ``vm create`` or ``run`` means adding one of each. Failures print
``hyperctl ERROR: <message>`` on stderr and exit non-zero.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

from twisted.internet import defer, task

from hyperd import __version__
from hyperd.client.client import DEFAULT_SOCKET_PATH, HyperClient, HyperClientError, parse_host

__all__ = ["main", "COMMANDS", "command", "mem_size_string"]

Handler = Callable[[HyperClient, argparse.Namespace, TextIO], Awaitable[int | None]]

#: name -> (help, add_arguments(parser), handler)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {}


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    """Register ``hyperctl <name>``. Names with a space (``"vm create"``) become nested subcommands."""

    def register(handler: Handler) -> Handler:
        COMMANDS[name] = (help, arguments, handler)
        return handler

    return register


class UsageFailure(Exception):
    """A command was used wrongly; printed like a server error."""


def mem_size_string(size: int) -> str:
    """hyperctl's getMemSizeString."""
    if size < 1024 * 1024:
        return f"{size} KB"
    if size < 1024 * 1024 * 1024:
        return f"{size / (1024.0 * 1024.0):.1f} MB"
    return f"{size / (1024.0 * 1024.0 * 1024.0):.1f} GB"


# --- commands ---------------------------------------------------------------------------------------------


@command("info", "Display system-wide information")
async def cmd_info(client: HyperClient, args: argparse.Namespace, out: TextIO) -> None:
    info = await client.info()
    out.write(f"Images: {int(info.get('Images', 0))}\n")
    if "Containers" in info:
        out.write(f"Containers: {int(info['Containers'])}\n")
    out.write(f"PODs: {int(info.get('Pods', 0))}\n")
    out.write(f"Storage Driver: {info.get('Driver', '')}\n")
    for pair in info.get("DriverStatus") or []:
        if isinstance(pair, list) and len(pair) >= 2:
            out.write(f"  {pair[0]}: {pair[1]}\n")
    out.write(f"Hyper Root Dir: {info.get('DockerRootDir', '')}\n")
    out.write(f"Index Server Address: {info.get('IndexServerAddress', '')}\n")
    out.write(f"Execution Driver: {info.get('ExecutionDriver', '')}\n")
    out.write(f"Total Memory: {mem_size_string(int(info.get('MemTotal', 0)))}\n")
    out.write(f"Operating System: {info.get('Operating System', '')}\n")


@command("version", "Show the hyperctl and hyperd version information")
async def cmd_version(client: HyperClient, args: argparse.Namespace, out: TextIO) -> None:
    out.write(f"The hyperctl version is {__version__}\n")
    version = await client.version()
    out.write(f"The hyperd version is {version.get('Version', '')} (API {version.get('ApiVersion', '')})\n")


def _list_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("item", nargs="?", default="pod", help="pod, container or vm (default pod)")
    p.add_argument("-p", "--pod", help="only this pod's items")
    p.add_argument("-m", "--vm", help="only this VM's items")
    p.add_argument("-q", "--quiet", action="store_true", help="only display the IDs")


@command("list", "List all pods, containers or VMs", _list_arguments)
async def cmd_list(client: HyperClient, args: argparse.Namespace, out: TextIO) -> None:
    item = args.item
    if item not in ("pod", "container", "vm"):
        raise UsageFailure(f"Error, the hyperctl can not support {item} list!")
    rows = [r.split(":") for r in await client.list(item, pod=args.pod, vm=args.vm)]
    if args.quiet:
        for fields in rows:
            out.write(f"{fields[0]}\n")
        return
    if item == "vm":
        out.write(f"{'VM name':>15}{'Status':>20}\n")
        for f in rows:
            out.write(f"{f[0]:>15}{_at(f, 2):>20}\n")
    elif item == "pod":
        out.write(f"{'POD ID':>15}{'POD Name':>30}{'VM name':>20}{'Status':>10}\n")
        for f in rows:
            out.write(f"{f[0]:>15}{_at(f, 1)[:27]:>30}{_at(f, 2):>20}{_at(f, 3):>10}\n")
    else:
        out.write(f"{'Container ID':<66}{'Name':<20}{'POD ID':>15}{'Status':>10}\n")
        for f in rows:
            name = _at(f, 1).removeprefix("/")
            out.write(f"{f[0]:<66}{name:<20}{_at(f, 2):>15}{_at(f, 3):>10}\n")


def _vm_create_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpu", type=int, default=1, help="vCPUs (default 1)")
    p.add_argument("--mem", "--memory", type=int, default=128, help="memory in MB (default 128)")
    p.add_argument("--async", dest="async_", action="store_true", help="do not wait for the VM to boot")


@command("vm create", "Boot an idle VM and print its id", _vm_create_arguments)
async def cmd_vm_create(client: HyperClient, args: argparse.Namespace, out: TextIO) -> None:
    out.write(f"{await client.create_vm(args.cpu, args.mem, wait=not args.async_)}\n")


def _vm_kill_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("vm", nargs="+", help="VM ids")


@command("vm kill", "Stop and remove VMs", _vm_kill_arguments)
async def cmd_vm_kill(client: HyperClient, args: argparse.Namespace, out: TextIO) -> None:
    for vm_id in args.vm:
        await client.kill_vm(vm_id)
        out.write(f"VM({vm_id}) is killed\n")


def _at(fields: list[str], i: int) -> str:
    return fields[i] if i < len(fields) else ""


# --- plumbing -------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyperctl", description="A client for hyperd: pods of containers, each in its own VM.")
    parser.add_argument("-H", "--host", default=os.environ.get("HYPER_HOST"),
                        help=f"the daemon's socket, unix:///path (default unix://{DEFAULT_SOCKET_PATH}, "
                             "or $HYPER_HOST)")
    parser.add_argument("-v", "--version", action="version", version=f"hyperctl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    groups: dict[str, Any] = {}
    for name, (help_, arguments, handler) in sorted(COMMANDS.items()):
        words = name.split()
        target = sub
        for i, word in enumerate(words[:-1]):
            key = " ".join(words[: i + 1])
            if key not in groups:
                group = target.add_parser(word, help=f"{word} commands")
                groups[key] = group.add_subparsers(dest=f"sub_{key.replace(' ', '_')}", metavar="COMMAND")
                groups[key].required = True
            target = groups[key]
        p = target.add_parser(words[-1], help=help_, description=help_)
        arguments(p)
        p.set_defaults(handler=handler)
    return parser


async def run(reactor: Any, argv: list[str], out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run one hyperctl command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        path = parse_host(args.host)
    except ValueError as e:
        err.write(f"hyperctl ERROR: {e}\n")
        return 1
    client = HyperClient(reactor, path)
    try:
        status = await args.handler(client, args, out)
        return int(status or 0)
    except (HyperClientError, UsageFailure) as e:
        err.write(f"hyperctl ERROR: {e}\n")
        return 1
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv

    def _main(reactor: Any) -> defer.Deferred:
        async def go() -> None:
            status = await run(reactor, argv)
            if status:
                raise SystemExit(status)

        return defer.ensureDeferred(go())

    task.react(_main)


# Command modules register their subcommands when imported.
from hyperd.client import (  # noqa: E402
    images,  # noqa: E402,F401
    net_commands,  # noqa: E402,F401
    pod_commands,  # noqa: E402,F401
    stream_commands,  # noqa: E402,F401
)
