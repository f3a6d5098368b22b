"""``hyperctl ports ls|add|delete [-p RULE]... POD``: a pod's port mappings.

A RULE is ``--publish``'s ``[tcp|udp:]HOSTPORT:CONTAINERPORT`` (ranges as ``8000-8010``; a container port
alone: any free host port). Importing this module registers the commands (``hyperd.client.cli`` does).
"""

from __future__ import annotations

import argparse
from typing import Any, TextIO
from urllib.parse import quote

from hyperd.client.cli import UsageFailure, command
from hyperd.client.client import HyperClient
from hyperd.network.ports import parse_publish

__all__ = ["publish_mappings", "list_port_mappings", "change_port_mappings"]


def publish_mappings(rules: list[str], flag: str = "--publish") -> list[dict[str, str]]:
    """``--publish``/``-p`` rules → portmappings entries; UsageFailure naming the bad one."""
    out = []
    for rule in rules:
        try:
            out.append(parse_publish(rule))
        except ValueError as e:
            raise UsageFailure(f"{flag} {e}") from None
    return out


async def list_port_mappings(client: HyperClient, pod: str) -> list[dict[str, Any]]:
    reply = await client.get_json("GET", f"/pod/{quote(pod, safe='')}/portmappings")
    return list((reply or {}).get("portMappings") or [])


async def change_port_mappings(client: HyperClient, pod: str, action: str, mappings: list[dict[str, str]]) -> None:
    await client.request("PUT", f"/pod/{quote(pod, safe='')}/portmappings/{action}", body=mappings)


def _ls_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pod", metavar="POD")


def _change_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--publish", action="append", default=[], metavar="RULE", required=True,
                   help="[tcp|udp:]HOSTPORT:CONTAINERPORT (ranges as 8000-8010); repeatable")
    p.add_argument("pod", metavar="POD")


@command("ports ls", "List a pod's port mappings", _ls_arguments)
async def cmd_ports_ls(client: HyperClient, args: argparse.Namespace, out: TextIO) -> None:
    mappings = await list_port_mappings(client, args.pod)
    out.write("Protocol\tHost Ports\tContainer Ports\n")
    for m in mappings:
        out.write(f"{m.get('protocol', 'tcp')}\t{m.get('hostPort', '')}\t{m.get('containerPort', '')}\n")


@command("ports add", "Add port mappings to a pod (applied at once if it runs)", _change_arguments)
async def cmd_ports_add(client: HyperClient, args: argparse.Namespace, out: TextIO) -> None:
    await change_port_mappings(client, args.pod, "add", publish_mappings(args.publish, "-p"))


@command("ports delete", "Delete port mappings from a pod", _change_arguments)
async def cmd_ports_delete(client: HyperClient, args: argparse.Namespace, out: TextIO) -> None:
    await change_port_mappings(client, args.pod, "delete", publish_mappings(args.publish, "-p"))
