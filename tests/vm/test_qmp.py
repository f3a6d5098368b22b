"""The QMP client over an in-memory transport: negotiation, ids, errors, events, connection loss."""

import json

from twisted.internet.testing import StringTransport

from hyperd.vm.qmp import QMPClosed, QMPError, QMPProtocol

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 22}}, "capabilities": []}}


def sent(transport):
    lines = [json.loads(x) for x in transport.value().split(b"\n") if x]
    transport.clear()
    return lines


def feed(proto, *messages, split=None):
    data = b"".join(json.dumps(m).encode() + b"\r\n" for m in messages)
    if split is None:
        proto.dataReceived(data)
    else:
        for i in range(0, len(data), split):
            proto.dataReceived(data[i:i + split])


def negotiated():
    proto = QMPProtocol()
    t = StringTransport()
    proto.makeConnection(t)
    feed(proto, GREETING)
    (cap,) = sent(t)
    assert cap["execute"] == "qmp_capabilities"
    feed(proto, {"return": {}, "id": cap["id"]})
    assert proto.ready.called
    return proto, t


def test_greeting_then_capabilities_then_ready():
    proto = QMPProtocol()
    t = StringTransport()
    proto.makeConnection(t)
    ready = []
    proto.ready.addCallback(ready.append)
    assert not ready and t.value() == b""
    feed(proto, GREETING, split=7)
    (cap,) = sent(t)
    assert cap["execute"] == "qmp_capabilities" and "id" in cap
    assert not ready
    feed(proto, {"return": {}, "id": cap["id"]})
    assert ready == [GREETING]


def test_events_during_negotiation_are_delivered_and_do_not_confuse_it():
    proto = QMPProtocol()
    t = StringTransport()
    proto.makeConnection(t)
    events = []
    proto.add_event_observer(lambda name, e: events.append(name))
    feed(proto, {"event": "RESUME", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}, GREETING)
    (cap,) = sent(t)
    feed(proto, {"event": "NIC_RX_FILTER_CHANGED", "data": {}}, {"return": {}, "id": cap["id"]})
    assert proto.ready.called
    assert events == ["RESUME", "NIC_RX_FILTER_CHANGED"]


def test_replies_match_by_id_even_out_of_order():
    proto, t = negotiated()
    a, b = [], []
    proto.execute("query-status").addCallback(a.append)
    proto.execute("query-name", {"x": 1}).addCallback(b.append)
    q1, q2 = sent(t)
    assert q1["execute"] == "query-status" and "arguments" not in q1
    assert q2["arguments"] == {"x": 1}
    assert q1["id"] != q2["id"]
    feed(proto, {"return": {"name": "vm"}, "id": q2["id"]}, {"return": {"status": "running"}, "id": q1["id"]})
    assert a == [{"status": "running"}] and b == [{"name": "vm"}]


def test_error_reply_is_a_typed_exception():
    proto, t = negotiated()
    d = proto.execute("nonsense")
    (q,) = sent(t)
    feed(proto, {"error": {"class": "CommandNotFound", "desc": "The command nonsense has not been found"},
                 "id": q["id"]})
    f = []
    d.addErrback(f.append)
    assert f[0].check(QMPError)
    assert f[0].value.error_class == "CommandNotFound"
    assert "nonsense" in f[0].value.desc


def test_garbage_lines_are_ignored():
    proto, t = negotiated()
    d = proto.execute("query-status")
    (q,) = sent(t)
    proto.dataReceived(b"not json\n[1,2]\n\n")
    feed(proto, {"return": {}, "id": q["id"]})
    assert d.called


def test_connection_loss_fails_pending_and_later_commands():
    proto, t = negotiated()
    d = proto.execute("query-status")
    proto.connectionLost(None)
    f = []
    d.addErrback(f.append)
    assert f[0].check(QMPClosed)
    assert proto.closed.called
    f2 = []
    proto.execute("cont").addErrback(f2.append)
    assert f2[0].check(QMPClosed)


def test_loss_before_negotiation_fails_ready():
    proto = QMPProtocol()
    proto.makeConnection(StringTransport())
    proto.connectionLost(None)
    f = []
    proto.ready.addErrback(f.append)
    assert f[0].check(QMPClosed)
