"""Images from the client side: the calls (pull with progress, list, remove, load, save) and ``hyperctl
pull|images|rmi|load|save``.

The calls take a :class:`~hyperd.client.client.HyperClient`. Importing this module registers the commands
with :func:`hyperd.client.cli.command` (``hyperd.client.cli`` imports it at its end).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import sys
from collections.abc import Callable
from typing import IO, Any, BinaryIO, TextIO
from urllib.parse import urlencode

import treq
from twisted.internet.error import ConnectError

from hyperd import __version__
from hyperd.client.cli import UsageFailure, command, mem_size_string
from hyperd.client.client import HyperClient, HyperClientError, _error_message

__all__ = ["pull", "images", "remove", "load", "save", "registry_auth", "ProgressDisplay"]

Message = dict[str, Any]


def registry_auth(username: str, password: str) -> str:
    """The ``X-Registry-Auth`` header value for a user and password (base64url JSON, Docker's AuthConfig)."""
    return base64.urlsafe_b64encode(json.dumps({"username": username, "password": password}).encode()).decode()


async def _request(client: HyperClient, method: str, path: str, params: dict[str, Any] | None = None,
                   headers: dict[str, list[str]] | None = None, data: Any = None) -> Any:
    """A request whose body is left unread (streams); raises HyperClientError for a non-2xx status."""
    hdrs = {"Accept": ["application/json"], "User-Agent": [f"hyperd-client/{__version__}"]}
    hdrs.update(headers or {})
    try:
        url = client._url(path, {k: v for k, v in (params or {}).items() if not isinstance(v, list)})
        repeated = [(k, item) for k, v in (params or {}).items() if isinstance(v, list) for item in v]
        if repeated:  # names=a&names=b
            url += ("&" if "?" in url else "?") + urlencode(repeated)
        response = await client._http.request(method, url, headers=hdrs, data=data, unbuffered=True)
    except ConnectError as e:
        reason = os.strerror(e.osError) if isinstance(e.osError, int) else (e.args[0] if e.args else str(e))
        raise HyperClientError(0, f"cannot connect to hyperd at {client.socket_path}: {reason}") from None
    if not 200 <= response.code < 300:
        content = await treq.content(response)
        raise HyperClientError(response.code, _error_message(content, response.code))
    return response


async def pull(client: HyperClient, name: str, tag: str | None = None, auth: str | None = None,
               on_progress: Callable[[Message], None] | None = None) -> list[Message]:
    """Pull an image; every progress message goes to ``on_progress``. An error in the stream raises."""
    headers = {"X-Registry-Auth": [auth]} if auth else None
    response = await _request(client, "POST", "/image/create", {"imageName": name, "tag": tag}, headers)
    messages: list[Message] = []
    buffer = [b""]

    def received(data: bytes) -> None:
        buffer[0] += data
        *lines, buffer[0] = buffer[0].split(b"\n")
        for line in lines:
            if line.strip():
                message = json.loads(line)
                messages.append(message)
                if on_progress and "error" not in message:
                    on_progress(message)

    await treq.collect(response, received)
    if buffer[0].strip():
        received(b"\n")
    errors = [m for m in messages if "error" in m]
    if errors:
        raise HyperClientError(500, str(errors[-1]["error"]))
    return messages


async def images(client: HyperClient, all: bool = False) -> list[str]:
    """hyperd's ``repo:tag:id:created:size`` strings."""
    reply = await client.get_json("GET", "/images/get", {"all": "yes" if all else None})
    return list(reply.get("imagesList") or [])


async def remove(client: HyperClient, ref: str, force: bool = False) -> list[dict[str, str]]:
    """``[{"Untagged": name}, ..., {"Deleted": "sha256:..."}]``."""
    reply = await client.get_json("DELETE", "/image", {"imageId": ref, "force": "yes" if force else None})
    return list(reply.get("imagesList") or [])


async def load(client: HyperClient, archive: BinaryIO) -> list[str]:
    """Load a ``docker save`` or OCI layout tar (streamed from ``archive``); the lines the daemon said."""
    response = await _request(client, "POST", "/image/load", headers={"Content-Type": ["application/x-tar"]},
                              data=archive)
    content = await treq.content(response)
    lines = []
    for line in content.splitlines():
        if line.strip():
            message = json.loads(line)
            if "error" in message:
                raise HyperClientError(500, str(message["error"]))
            lines.append(str(message.get("stream", "")).rstrip("\n"))
    return lines


async def save(client: HyperClient, names: list[str], out: IO[bytes]) -> int:
    """Write an OCI layout tar of the images named to ``out``; return the bytes written."""
    response = await _request(client, "GET", "/images/save", {"names": names})
    written = [0]

    def received(data: bytes) -> None:
        out.write(data)
        written[0] += len(data)

    await treq.collect(response, received)
    return written[0]


# --- hyperctl ---------------------------------------------------------------------------------------------


class ProgressDisplay:
    """Docker's pull display: one line per layer, redrawn in place on a terminal; on anything else, a line
    for each change of status (not each downloaded chunk)."""

    def __init__(self, out: TextIO, tty: bool | None = None) -> None:
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self.lines: dict[str, str] = {}
        self.status: dict[str, str] = {}
        self.drawn = 0

    def __call__(self, message: Message) -> None:
        status, lid = message.get("status", ""), message.get("id")
        if not lid or status.startswith(("Pulling from", "Digest:", "Status:")):
            self._print(f"{lid}: {status}" if lid else status)
            return
        text = f"{lid}: {status}" + (f" {message['progress']}" if message.get("progress") else "")
        if self.tty:
            self.lines[lid] = text
            self._redraw()
        elif self.status.get(lid) != status:
            self.status[lid] = status
            self.out.write(f"{lid}: {status}\n")

    def _print(self, text: str) -> None:
        if self.tty and self.drawn:
            self.lines = {}
            self.drawn = 0
        self.out.write(text + "\n")

    def _redraw(self) -> None:
        if self.drawn:
            self.out.write(f"\x1b[{self.drawn}A")
        for text in self.lines.values():
            self.out.write(f"\x1b[2K{text}\n")
        self.drawn = len(self.lines)
        self.out.flush()


def _pull_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="the image: NAME[:TAG|@DIGEST], e.g. busybox or 127.0.0.1:5000/app:v1")
    p.add_argument("-u", "--username", help="log in to the registry as this user")
    p.add_argument("-p", "--password", default=os.environ.get("HYPER_REGISTRY_PASSWORD"),
                   help="the password (default $HYPER_REGISTRY_PASSWORD)")


@command("pull", "Pull an image from a registry", _pull_arguments)
async def cmd_pull(client: HyperClient, args: argparse.Namespace, out: TextIO) -> None:
    auth = registry_auth(args.username, args.password or "") if args.username else None
    await pull(client, args.image, auth=auth, on_progress=ProgressDisplay(out))


def _images_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-a", "--all", action="store_true", help="show all images")
    p.add_argument("-q", "--quiet", action="store_true", help="only show image ids")


@command("images", "List images", _images_arguments)
async def cmd_images(client: HyperClient, args: argparse.Namespace, out: TextIO) -> None:
    entries = await images(client, args.all)
    if args.quiet:
        seen = []
        for entry in entries:
            image_id = entry.rsplit(":", 3)[1][:12]
            if image_id not in seen:
                seen.append(image_id)
        out.write("".join(f"{i}\n" for i in seen))
        return
    rows = [("REPOSITORY", "TAG", "IMAGE ID", "CREATED", "VIRTUAL SIZE")]
    for entry in entries:
        # split from the right: a registry name may hold a colon (127.0.0.1:5000/app)
        repo_tag, image_id, created, size = entry.rsplit(":", 3)
        repo, _, tag = repo_tag.rpartition(":")
        when = datetime.datetime.fromtimestamp(int(created)).strftime("%Y-%m-%d %H:%M:%S") if created != "0" else ""
        rows.append((repo, tag, image_id[:12], when, mem_size_string(int(size))))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        out.write("   ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "   " + row[4] + "\n")


def _rmi_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image names or ids")
    p.add_argument("-f", "--force", action="store_true", help="remove even if a container uses it (untags)")


@command("rmi", "Remove one or more images", _rmi_arguments)
async def cmd_rmi(client: HyperClient, args: argparse.Namespace, out: TextIO) -> None:
    errors = []
    for ref in args.images:  # each one, as docker rmi does; the failures are reported at the end
        try:
            for entry in await remove(client, ref, args.force):
                for key, value in entry.items():
                    out.write(f"{key}: {value}\n")
        except HyperClientError as e:
            errors.append(e)
    if errors:
        raise HyperClientError(errors[-1].status, "; ".join(e.message for e in errors))


def _load_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--input", help="read from this tar file instead of stdin")


@command("load", "Load an image from a tar archive (docker save or OCI layout)", _load_arguments)
async def cmd_load(client: HyperClient, args: argparse.Namespace, out: TextIO) -> None:
    if args.input:
        with open(args.input, "rb") as f:
            lines = await load(client, f)
    else:
        if sys.stdin.isatty():
            raise UsageFailure("load: give a file with -i, or pipe a tar into stdin")
        lines = await load(client, sys.stdin.buffer)
    out.write("".join(f"{line}\n" for line in lines))


def _save_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image names or ids")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.add_argument("-f", "--format", default="oci", choices=["oci"], help="the archive format (oci)")


@command("save", "Save images to a tar archive (an OCI layout, also read by docker load)", _save_arguments)
async def cmd_save(client: HyperClient, args: argparse.Namespace, out: TextIO) -> None:
    if args.output:
        tmp = args.output + ".part"
        try:
            with open(tmp, "wb") as f:
                await save(client, args.images, f)
            os.rename(tmp, args.output)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    if sys.stdout.isatty():
        raise UsageFailure("save: refusing to write a tar to a terminal: use -o FILE or a pipe")
    await save(client, args.images, sys.stdout.buffer)
    sys.stdout.buffer.flush()
