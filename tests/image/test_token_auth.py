"""Bearer token auth, as Docker Hub does it, against a real docker-registry configured for token auth.

The registry answers 401 with ``WWW-Authenticate: Bearer realm=...,service=...,scope=...``; the token server
here (a thread: skopeo pushes through it while the reactor is blocked) signs ES256 JWTs with a self-signed
certificate the registry trusts (``rootcertbundle``). It grants what is asked to alice with her password,
``pull`` on ``public/*`` to anyone, and nothing else.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from hyperd.image.registry import Credentials, Unauthorized
from tests.image.conftest import PASSWORD, USER, free_port, image_manifest, tar_layer, write_layout

SERVICE, ISSUER = "hyperd-test-registry", "hyperd-test-issuer"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    def __init__(self, directory: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hyperd test token issuer")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.bundle = os.path.join(directory, "token.pem")
        with open(self.bundle, "wb") as f:
            f.write(self.cert.public_bytes(serialization.Encoding.PEM))
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
                auth = self.headers.get("Authorization", "")
                user = None
                if auth.startswith("Basic "):
                    name, _, password = base64.b64decode(auth[6:]).decode().partition(":")
                    if (name, password) != (USER, PASSWORD):
                        self.send_response(401)
                        self.end_headers()
                        return
                    user = name
                server.requests.append({"user": user, "scope": query.get("scope", []),
                                        "service": query.get("service", [""])[0]})
                access = []
                for scope in query.get("scope", []):
                    kind, _, rest = scope.partition(":")
                    repo, _, actions = rest.rpartition(":")
                    granted = actions.split(",") if user else (["pull"] if repo.startswith("public/") else [])
                    access.append({"type": kind, "name": repo, "actions": [a for a in actions.split(",")
                                                                           if a in granted]})
                body = json.dumps({"token": server.token(user or "", access)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def token(self, subject: str, access: list[dict]) -> str:
        header = {"alg": "ES256", "typ": "JWT",
                  "x5c": [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()]}
        now = int(time.time())
        claims = {"iss": ISSUER, "sub": subject, "aud": SERVICE, "exp": now + 300, "nbf": now - 10, "iat": now,
                  "jti": _b64(os.urandom(12)), "access": access}
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def token_registry():
    directory = tempfile.mkdtemp(prefix="hdtok", dir="/tmp")
    tokens = TokenServer(directory)
    host = f"127.0.0.1:{free_port()}"
    config = os.path.join(directory, "config.yml")
    with open(config, "w") as f:
        f.write("version: 0.1\nlog: {level: warn}\n"
                f"storage:\n  filesystem: {{rootdirectory: {directory}/data}}\n"
                f"http: {{addr: '{host}', secret: hyperd-test}}\n"
                f"auth:\n  token: {{realm: '{tokens.url}', service: {SERVICE}, issuer: {ISSUER}, "
                f"rootcertbundle: {tokens.bundle}}}\n")
    log = open(os.path.join(directory, "registry.log"), "wb")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(["docker-registry", "serve", config], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                urllib.request.urlopen(f"http://{host}/v2/", timeout=1)
            except urllib.error.HTTPError:
                break  # the 401 challenge: up
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "docker-registry did not start"
                time.sleep(0.05)
        yield host, tokens, directory
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        log.close()
        tokens.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _push(host: str, directory: str, name: str, files: dict) -> None:
    layout = os.path.join(directory, "layout-" + name.replace("/", "-"))
    write_layout(layout, [("latest", image_manifest(layout, [tar_layer(files)]))])
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--dest-creds", f"{USER}:{PASSWORD}",
                    f"oci:{layout}:latest", f"docker://{host}/{name}:latest"], check=True, capture_output=True)


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_bearer_token_challenge_anonymous_and_with_credentials(token_registry, service):
    host, tokens, directory = token_registry
    _push(host, directory, "public/app", {"public": b"anyone"})
    _push(host, directory, "private/app", {"private": b"alice only"})
    # Anonymous: the registry challenges, the token server grants pull on public/*.
    tokens.requests.clear()
    image = await service.pull(f"{host}/public/app")
    assert open(os.path.join(service.store.rootfs_dir(image.id), "public"), "rb").read() == b"anyone"
    assert tokens.requests == [{"user": None, "scope": ["repository:public/app:pull"], "service": SERVICE}]
    # The token is cached for the repository: a second pull asks for no new one.
    await service.pull(f"{host}/public/app")
    assert len(tokens.requests) == 1
    # Anonymous on a private repository: a token without access, then refused.
    with pytest.raises(Unauthorized, match="private/app"):
        await service.pull(f"{host}/private/app")
    # Wrong password: the token server refuses.
    with pytest.raises(Unauthorized, match="token server"):
        await service.pull(f"{host}/private/app", auth=Credentials(USER, "wrong"))
    # With credentials: a token for alice.
    image = await service.pull(f"{host}/private/app", auth=Credentials(USER, PASSWORD))
    assert open(os.path.join(service.store.rootfs_dir(image.id), "private"), "rb").read() == b"alice only"
    assert tokens.requests[-1]["user"] == USER
    # alice's token is hers: an anonymous pull of the same repository does not ride on it.
    with pytest.raises(Unauthorized):
        await service.pull(f"{host}/private/app")
