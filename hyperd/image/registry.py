"""A client for registries that speak the distribution v2 API (Docker Hub, any private one), over treq.

:class:`RegistryClient` fetches manifests and streams blobs to disk. It answers the ``WWW-Authenticate``
challenge of a 401: ``Bearer`` (a token from the realm, with the user's credentials if any, cached per
registry and repository) or ``Basic``. It speaks plain HTTP to 127.0.0.0/8, localhost and the configured
insecure registries, HTTPS to every other.

A blob is written through a :class:`~hyperd.image.store.BlobWriter` in a worker thread (hashing and writing
never block the reactor), with the HTTP stream paused while the writes lag behind. A download cut off or
stalled is retried, resuming with a ``Range`` request where the registry allows it; the blob is verified
against its digest before it is put in place, so a cut-off download leaves nothing behind.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import re
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlencode

import attrs
import treq
from treq.client import HTTPClient
from twisted.internet import defer
from twisted.internet import error as net_error
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import client as web_client
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss

from hyperd import __version__
from hyperd.errors import BadParameter, HyperError, NotFound
from hyperd.image.reference import DEFAULT_REGISTRY, Reference
from hyperd.image.store import INDEX_TYPES, MANIFEST_TYPES, BlobWriter

__all__ = ["Credentials", "RegistryClient", "RegistryError", "is_insecure", "parse_registry_auth"]

log = Logger()

DOCKER_HUB_HOST = "registry-1.docker.io"
ACCEPT_MANIFESTS = ", ".join(MANIFEST_TYPES + INDEX_TYPES)
SCHEMA1_TYPES = ("application/vnd.docker.distribution.manifest.v1+json",
                 "application/vnd.docker.distribution.manifest.v1+prettyjws")
#: Writes lagging further behind than this pause the download (bounded memory per blob).
HIGH_WATER = 4 * 1024 * 1024
MAX_MANIFEST = 4 * 1024 * 1024
_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))')


class RegistryError(HyperError):
    """A registry could not be reached, refused us, or sent something wrong (the message names it)."""

    status = 500


class Unauthorized(HyperError):
    status = 401


@attrs.frozen
class Credentials:
    """What the user gave to log in to a registry (Docker's AuthConfig)."""

    username: str = ""
    password: str = ""
    registry_token: str = ""

    def basic(self) -> bytes:
        return b"Basic " + base64.b64encode(f"{self.username}:{self.password}".encode())

    def __bool__(self) -> bool:
        return bool(self.username or self.registry_token)


def parse_registry_auth(header: str | bytes | None) -> Credentials | None:
    """The ``X-Registry-Auth`` header: base64url (padded or not) of Docker's AuthConfig JSON."""
    if not header:
        return None
    text = header.decode("ascii", "replace") if isinstance(header, bytes) else header
    text = text.strip()
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        config = json.loads(raw)
    except (binascii.Error, ValueError):
        raise BadParameter("bad parameter: X-Registry-Auth is not base64url-encoded JSON") from None
    if not isinstance(config, dict):
        raise BadParameter("bad parameter: X-Registry-Auth must hold a JSON object")
    username, password = config.get("username") or "", config.get("password") or ""
    if not username and config.get("auth"):
        try:
            username, _, password = base64.b64decode(config["auth"]).decode().partition(":")
        except (binascii.Error, ValueError):
            raise BadParameter("bad parameter: X-Registry-Auth: auth is not base64 user:password") from None
    credentials = Credentials(str(username), str(password), str(config.get("registrytoken") or ""))
    return credentials or None


def is_insecure(registry: str, insecure: Iterable[str] = ()) -> bool:
    """Plain HTTP for loopback registries and the configured insecure ones (host or host:port)."""
    if registry in insecure:
        return True
    host = registry
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host in insecure or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
              for m in _CHALLENGE_PARAM.finditer(rest)}
    return scheme.lower(), params


def _registry_message(body: bytes) -> str:
    """The message of a distribution error body (``{"errors":[{"code","message"}]}``), or the body."""
    try:
        errors = json.loads(body).get("errors") or []
        return "; ".join(f"{e.get('code', '').lower()}: {e.get('message', '')}".strip(": ") for e in errors)
    except (ValueError, AttributeError, TypeError):
        return body[:200].decode("utf-8", "replace").strip()


class _Retryable(Exception):
    """A download failure worth another try (connection cut, stall, 5xx)."""


class RegistryClient:
    """Talks to registries for one daemon; ``close`` it at shutdown (its connections are pooled)."""

    def __init__(self, reactor: Any, insecure_registries: Iterable[str] = (), *, retries: int = 3,
                 backoff: float = 0.5, timeout: float = 30.0, stall_timeout: float = 60.0,
                 run_in_thread: Callable[..., defer.Deferred] | None = None) -> None:
        self.reactor = reactor
        self.insecure = tuple(insecure_registries)
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        self.stall_timeout = stall_timeout
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 8
        self._pool.retryAutomatically = False
        self._http = HTTPClient(Agent(reactor, pool=self._pool, connectTimeout=timeout))
        # (registry, repository, credentials) -> Authorization header value
        self._authorization: dict[tuple[str, str, Credentials | None], bytes] = {}
        self._run_in_thread = run_in_thread

    async def close(self) -> None:
        await self._pool.closeCachedConnections()

    def base_url(self, registry: str) -> str:
        host = DOCKER_HUB_HOST if registry == DEFAULT_REGISTRY else registry
        scheme = "http" if is_insecure(registry, self.insecure) else "https"
        return f"{scheme}://{host}"

    # --- requests and auth -----------------------------------------------------------------------------

    async def _send(self, registry: str, method: str, url: str, headers: dict[str, list[bytes]],
                    timeout: float | None = None) -> Any:
        try:
            return await self._http.request(method, url, headers=headers, unbuffered=True,
                                            timeout=timeout or self.timeout)
        except defer.CancelledError:
            raise RegistryError(f"registry {registry} did not answer within {timeout or self.timeout:g} s") \
                from None
        except (net_error.ConnectError, net_error.DNSLookupError, net_error.TimeoutError,
                web_client.ResponseNeverReceived, web_client.ResponseFailed) as e:
            reason = _failure_reason(e)
            raise RegistryError(f"registry {registry} is unreachable ({self.base_url(registry)}): {reason}") \
                from None

    async def request(self, ref: Reference, method: str, path: str, headers: dict[str, list[bytes]] | None = None,
                      credentials: Credentials | None = None) -> Any:
        """A request to ``ref``'s registry on ``/v2/<repository>/<path>``, logging in when challenged."""
        url = f"{self.base_url(ref.registry)}/v2/{ref.repository}/{path}"
        headers = dict(headers or {})
        headers.setdefault("User-Agent", [f"hyperd/{__version__}".encode()])
        # per credentials too: a token got with one user's password must not serve a pull without it
        key = (ref.registry, ref.repository, credentials)
        for attempt in range(2):
            sent = dict(headers)
            if key in self._authorization:
                sent["Authorization"] = [self._authorization[key]]
            response = await self._send(ref.registry, method, url, sent)
            if response.code != 401 or attempt == 1:
                break
            challenges = response.headers.getRawHeaders("www-authenticate") or []
            await _drain(response)
            self._authorization[key] = await self._answer(ref, challenges, credentials)
        if response.code == 401:
            body = await _drain(response)
            raise Unauthorized(f"unauthorized: access to {ref.registry}/{ref.repository} was refused"
                               f"{' with the credentials given' if credentials else ' (log in first)'}: "
                               f"{_registry_message(body) or 'authentication required'}")
        return response

    async def _answer(self, ref: Reference, challenges: list[str], credentials: Credentials | None) -> bytes:
        parsed = [parse_challenge(c) for c in challenges]
        for scheme, params in parsed:
            if scheme == "bearer":
                return b"Bearer " + (await self._token(ref, params, credentials)).encode()
        for scheme, _ in parsed:
            if scheme == "basic":
                if not credentials or not credentials.username:
                    raise Unauthorized(f"unauthorized: registry {ref.registry} requires a user name and "
                                       "password")
                return credentials.basic()
        raise RegistryError(f"registry {ref.registry} asks for an authentication we do not speak: {challenges}")

    async def _token(self, ref: Reference, params: dict[str, str], credentials: Credentials | None) -> str:
        if credentials and credentials.registry_token:
            return credentials.registry_token
        realm = params.get("realm")
        if not realm:
            raise RegistryError(f"registry {ref.registry} sent a Bearer challenge without a realm")
        query = {"scope": params.get("scope") or f"repository:{ref.repository}:pull"}
        if params.get("service"):
            query["service"] = params["service"]
        headers = {"User-Agent": [f"hyperd/{__version__}".encode()]}
        if credentials and credentials.username:
            headers["Authorization"] = [credentials.basic()]
            query["account"] = credentials.username
        url = realm + ("&" if "?" in realm else "?") + urlencode(sorted(query.items()))
        response = await self._send(ref.registry, "GET", url, headers)
        body = await _drain(response)
        if response.code != 200:
            raise Unauthorized(f"unauthorized: the token server of {ref.registry} refused"
                               f"{' the credentials given' if credentials else ' an anonymous token'}: "
                               f"HTTP {response.code} {_registry_message(body)}")
        try:
            reply = json.loads(body)
            return reply.get("token") or reply["access_token"]
        except (ValueError, KeyError, AttributeError):
            raise RegistryError(f"the token server of {ref.registry} sent no token") from None

    # --- manifests -------------------------------------------------------------------------------------

    async def get_manifest(self, ref: Reference, credentials: Credentials | None = None,
                           digest: str | None = None) -> tuple[bytes, str, str]:
        """The manifest (or index) ``ref`` names, or the one with ``digest``: (bytes, media type, digest).

        The bytes are checked against the digest asked for, or the one the registry reports.
        """
        wanted = digest or ref.digest
        response = await self.request(ref, "GET", f"manifests/{wanted or ref.tag}",
                                      {"Accept": [ACCEPT_MANIFESTS.encode()]}, credentials)
        body = await _drain(response, MAX_MANIFEST)
        if response.code == 404:
            raise NotFound(f"no such image: {ref.short} (registry {ref.registry}: "
                           f"{_registry_message(body) or 'manifest unknown'})")
        if response.code != 200:
            raise RegistryError(f"registry {ref.registry} refused the manifest of {ref.short}: HTTP "
                                f"{response.code} {_registry_message(body)}")
        actual = "sha256:" + hashlib.sha256(body).hexdigest()
        reported = (response.headers.getRawHeaders("docker-content-digest") or [""])[0]
        expected = wanted or (reported if reported.startswith("sha256:") else "")
        if expected and actual != expected:
            raise RegistryError(f"registry {ref.registry} sent a manifest for {ref.short} whose digest "
                                f"{actual} is not {expected}: refused")
        media_type = (response.headers.getRawHeaders("content-type") or [""])[0].split(";")[0].strip()
        try:
            parsed = json.loads(body)
        except ValueError:
            raise RegistryError(f"registry {ref.registry} sent a manifest for {ref.short} that is not JSON") \
                from None
        media_type = parsed.get("mediaType") or media_type
        if media_type in SCHEMA1_TYPES or parsed.get("schemaVersion") == 1:
            raise RegistryError(f"{ref.short}: Docker schema 1 manifests are not supported")
        if media_type not in MANIFEST_TYPES + INDEX_TYPES:
            media_type = INDEX_TYPES[0] if "manifests" in parsed else MANIFEST_TYPES[0]
        return body, media_type, actual

    # --- blobs -----------------------------------------------------------------------------------------

    async def download_blob(self, ref: Reference, digest: str, writer: BlobWriter,
                            credentials: Credentials | None = None,
                            progress: Callable[[int], None] | None = None) -> None:
        """Stream the blob into ``writer`` (not committed here); retried and resumed on failure."""
        attempt = 0
        while True:
            try:
                await self._download_once(ref, digest, writer, credentials, progress)
                return
            except _Retryable as e:
                attempt += 1
                if attempt > self.retries:
                    raise RegistryError(f"registry {ref.registry}: download of {digest[:19]} failed "
                                        f"{attempt} times, last: {e}") from None
                log.info("blob {digest} from {registry}: {error}; retry {attempt} at byte {offset}",
                         digest=digest[:19], registry=ref.registry, error=str(e), attempt=attempt,
                         offset=writer.size)
                await deferLater(self.reactor, self.backoff * 2 ** (attempt - 1), lambda: None)

    async def _download_once(self, ref: Reference, digest: str, writer: BlobWriter,
                             credentials: Credentials | None, progress: Callable[[int], None] | None) -> None:
        headers: dict[str, list[bytes]] = {}
        offset = writer.size
        if offset:
            headers["Range"] = [b"bytes=%d-" % offset]
        try:
            response = await self.request(ref, "GET", f"blobs/{digest}", headers, credentials)
        except RegistryError as e:
            raise _Retryable(str(e)) from None
        if response.code == 404:
            await _drain(response)
            raise NotFound(f"registry {ref.registry} has no blob {digest} for {ref.short}")
        if response.code >= 500 or response.code == 429:
            await _drain(response)
            raise _Retryable(f"HTTP {response.code}")
        if response.code not in (200, 206):
            body = await _drain(response)
            raise RegistryError(f"registry {ref.registry} refused blob {digest}: HTTP {response.code} "
                                f"{_registry_message(body)}")
        if offset and response.code == 200:
            # the server cannot resume: start over
            await self._in_thread(writer.reset)
            if progress:
                progress(0)
        sink = _BlobSink(self, writer, progress, self.stall_timeout)
        response.deliverBody(sink)
        await sink.finished

    def _in_thread(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        if self._run_in_thread is None:
            return defer.maybeDeferred(f, *args)
        return self._run_in_thread(f, *args)


class _BlobSink(Protocol):
    """Receives a blob body; writes go to a worker thread one batch at a time, in order.

    When more than HIGH_WATER bytes wait for the disk, the HTTP transport is paused (memory stays bounded);
    no bytes for ``stall_timeout`` seconds cuts the connection (then retried).
    """

    def __init__(self, client: RegistryClient, writer: BlobWriter, progress: Callable[[int], None] | None,
                 stall_timeout: float) -> None:
        self.client = client
        self.writer = writer
        self.progress = progress
        self.finished: defer.Deferred = defer.Deferred()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._writing = False
        self._paused = False
        self._ended: Failure | None | bool = False
        self._error: Failure | None = None
        self._stall_timeout = stall_timeout
        self._stall = None
        self._stalled_out = False

    def connectionMade(self) -> None:
        self._arm()

    def _arm(self) -> None:
        reactor: IReactorTime = self.client.reactor
        if self._stall is not None and self._stall.active():
            self._stall.reset(self._stall_timeout)
        else:
            self._stall = reactor.callLater(self._stall_timeout, self._stalled)

    def _stalled(self) -> None:
        if self._paused:  # waiting for our own disk: not the server's fault
            self._arm()
            return
        self._stalled_out = True
        self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        self._arm()
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes > HIGH_WATER and not self._paused:
            self._paused = True
            self.transport.pauseProducing()
        self._flush()

    def _flush(self) -> None:
        if self._writing or self._error is not None:
            return
        if not self._pending:
            if self._ended is not False:
                self._finish()
            return
        batch, self._pending, self._pending_bytes = self._pending, [], 0
        self._writing = True
        d = self.client._in_thread(self._write, batch)
        d.addCallbacks(self._written, self._write_failed)

    def _write(self, batch: list[bytes]) -> int:
        for chunk in batch:
            self.writer.write(chunk)
        return self.writer.size

    def _written(self, size: int) -> None:
        if self.progress:
            try:
                self.progress(size)
            except Exception:
                self._write_failed(Failure())
                return
        self._writing = False
        if self._paused and self._ended is False:
            self._paused = False
            self.transport.resumeProducing()
        self._flush()

    def _write_failed(self, failure: Failure) -> None:
        self._writing = False
        self._error = failure
        if self._ended is False:
            self.transport.stopProducing()
        else:
            self._finish()

    def connectionLost(self, reason: Failure) -> None:
        if self._stall is not None and self._stall.active():
            self._stall.cancel()
        self._ended = None if reason.check(ResponseDone) else reason
        if not self._writing:
            self._flush() if self._error is None else self._finish()

    def _finish(self) -> None:
        if self.finished.called:
            return
        if self._error is not None:
            self.finished.errback(self._error)
        elif self._ended is None:
            self.finished.callback(None)
        else:
            detail = (f"no data for {self._stall_timeout:g} s" if self._stalled_out
                      else _failure_reason(self._ended.value))
            self.finished.errback(_Retryable(f"cut off after {self.writer.size} bytes ({detail})"))


def _failure_reason(e: BaseException) -> str:
    reasons = getattr(e, "reasons", None)
    if reasons:
        return "; ".join(_failure_reason(r.value) for r in reasons)
    text = str(e) or e.__class__.__name__
    return text


async def _drain(response: Any, limit: int | None = None) -> bytes:
    """The whole (small) body of a response; bodies over ``limit`` are refused."""
    try:
        body = await treq.content(response)
    except (web_client.ResponseFailed, PotentialDataLoss) as e:
        raise RegistryError(f"the registry cut off its reply: {_failure_reason(e)}") from None
    if limit is not None and len(body) > limit:
        raise RegistryError(f"the registry sent {len(body)} bytes where a manifest was expected")
    return body
