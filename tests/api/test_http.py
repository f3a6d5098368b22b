"""HTTP behaviour over the real socket: the error mapping, content types, prefixes, odd requests."""

import json
import shutil
import tempfile

import pytest

from tests.conftest import HyperdProcess, kill_processes_using


@pytest.fixture(scope="module")
def daemon():
    """One daemon for this module's read-only checks (none of them changes state)."""
    h = HyperdProcess(tempfile.mkdtemp(prefix="hd", dir="/tmp"))
    try:
        yield h.start()
    finally:
        h.cleanup()
        kill_processes_using(h.dir)
        shutil.rmtree(h.dir, ignore_errors=True)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("target", ["/nope", "/v1.17/nope", "/", "/pod/create/extra"])
def test_unknown_route_is_404_text_not_html(daemon, target):
    status, headers, body = daemon.request("GET", target)
    assert status == 404
    assert headers["content-type"].startswith("text/plain")
    assert b"<html" not in body.lower()
    assert body.startswith(b"page not found")


@pytest.mark.timeout(30)
def test_unknown_route_with_accept_json_is_a_json_message(daemon):
    status, headers, body = daemon.request("GET", "/nope", headers={"Accept": "application/json"})
    assert status == 404
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["message"].startswith("page not found")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("method,target,allowed", [
    ("POST", "/info", "GET"),
    ("DELETE", "/v1.17/list", "GET"),
    ("GET", "/vm/create", "POST"),
    ("GET", "/pod/create", "POST"),
    ("PUT", "/pod", "DELETE"),
])
def test_wrong_method_is_405_with_allow(daemon, method, target, allowed):
    status, headers, body = daemon.request(method, target)
    assert status == 405
    assert allowed in headers["allow"]
    assert headers["content-type"].startswith("text/plain")
    assert b"not allowed" in body


@pytest.mark.timeout(30)
@pytest.mark.parametrize("body", [b"{", b'{"id": "x",}', b"[1, 2", b"not json"])
def test_malformed_json_body_is_400_with_the_parser_complaint(daemon, body):
    status, headers, reply = daemon.request("POST", "/pod/create", body=body,
                                            headers={"Content-Type": "application/json"})
    assert status == 400
    assert reply.startswith(b"bad parameter: pod spec does not parse: ")
    assert b"line 1 column" in reply


@pytest.mark.timeout(30)
def test_malformed_pod_args_is_400(daemon):
    status, _, reply = daemon.request("POST", "/pod/create?podArgs=%7B%22id%22")
    assert status == 400
    assert reply.startswith(b"bad parameter: podArgs does not parse")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("body", [b"", b"[1]", b'"pod"'])
def test_pod_spec_must_be_a_json_object(daemon, body):
    status, _, reply = daemon.request("POST", "/pod/create", body=body)
    assert status == 400
    assert reply.startswith(b"bad parameter: ")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("target,message", [
    ("/vm/create?cpu=two", b"bad parameter: cpu must be an integer"),
    ("/vm/create?cpu=1&mem=1.5", b"bad parameter: mem must be an integer"),
    ("/vm/create?async=maybe", b"bad parameter: async must be yes or no"),
    ("/vm/kill", b"bad parameter: vm is required"),
    ("/pod/start", b"bad parameter: podId is required"),
    ("/pod/stop?podId=p&stopVM=perhaps", b"bad parameter: stopVm must be yes or no"),
    ("/pod/remove", b"bad parameter: podId is required"),
])
def test_bad_parameters_are_400_naming_the_parameter(daemon, target, message):
    status, _, reply = daemon.request("POST", target)
    assert status == 400
    assert reply.startswith(message)


@pytest.mark.timeout(30)
def test_unknown_list_item_is_400(daemon):
    status, _, reply = daemon.request("GET", "/list?item=image")
    assert status == 400
    assert b"Can not support image list!" in reply


@pytest.mark.timeout(30)
def test_list_defaults_to_pods(daemon):
    status, _, reply = daemon.request("GET", "/list")
    assert status == 200
    assert json.loads(reply) == {"item": "pod", "podData": []}


@pytest.mark.timeout(30)
def test_missing_host_header_is_not_a_500(daemon):
    status, _, body = daemon.request("GET", "/info", host=None)
    assert status == 200
    assert json.loads(body)["ID"] == str(daemon.proc.pid)
    # an empty Host (what Go's clients send on a UNIX socket) too
    assert daemon.request("GET", "/_ping", host="")[2] == b"OK"


@pytest.mark.timeout(30)
def test_http_1_0_without_host(daemon):
    from tests.conftest import unix_http

    reply = unix_http(daemon.socket_path, b"GET /v1.17/_ping HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.0 200") or reply.startswith(b"HTTP/1.1 200")
    assert reply.endswith(b"\r\n\r\nOK")


@pytest.mark.timeout(30)
def test_replies_carry_a_content_length_not_chunks(daemon):
    for target in ("/_ping", "/info", "/nope"):
        status, headers, body = daemon.request("GET", target)
        assert "transfer-encoding" not in headers
        assert int(headers["content-length"]) == len(body)


@pytest.mark.timeout(30)
def test_json_replies_have_sorted_keys(daemon):
    body = daemon.request("GET", "/version")[2]
    keys = list(json.loads(body))
    assert keys == sorted(keys)
