"""Unit tests of the hyperstart wire codec (hyperd/agent/codec.py): whole, split, merged, truncated, malformed."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperd.agent import codec


def test_ctl_frame_layout_is_code_length_payload():
    frame = codec.encode_ctl(codec.STARTPOD, b'{"a":1}')
    assert frame[:8] == struct.pack(">II", 1, 8 + 7)
    assert frame[8:] == b'{"a":1}'


def test_header_only_ready_is_eight_bytes():
    assert codec.encode_ctl(codec.READY) == struct.pack(">II", 8, 8)


def test_stream_frame_layout_is_seq_length_data():
    frame = codec.encode_stream(2**40 + 3, b"hi")
    assert frame == struct.pack(">QI", 2**40 + 3, 14) + b"hi"
    assert codec.encode_stream(5) == struct.pack(">QI", 5, 12)


def test_next_carries_a_u32_count():
    assert codec.encode_next(504) == struct.pack(">III", codec.NEXT, 12, 504)
    assert codec.decode_u32(struct.pack(">I", 4244)) == 4244


@pytest.mark.parametrize("payload", [b"", b"\0\0\0", b"\0\0\0\0\0"])
def test_decode_u32_rejects_wrong_sizes(payload):
    with pytest.raises(codec.FrameError):
        codec.decode_u32(payload)


def test_codes_match_hyperstart_api_h():
    assert (codec.GETVERSION, codec.STARTPOD, codec.DESTROYPOD, codec.EXECCMD, codec.READY, codec.ACK,
            codec.ERROR, codec.WINSIZE, codec.PING, codec.NEXT, codec.WRITEFILE, codec.READFILE,
            codec.NEWCONTAINER, codec.KILLCONTAINER, codec.REMOVECONTAINER, codec.PROCESSASYNCEVENT,
            codec.SIGNALPROCESS) == (0, 1, 4, 6, 8, 9, 10, 11, 12, 14, 15, 16, 17, 18, 22, 23, 24)
    assert codec.CODE_NAMES[codec.PROCESSASYNCEVENT] == "PROCESSASYNCEVENT"
    assert codec.API_VERSION == 4244


def test_split_frame_is_returned_once_complete():
    decoder = codec.CtlDecoder()
    frame = codec.encode_ctl(codec.EXECCMD, b"x" * 1000)
    assert decoder.feed(frame[:3]) == []
    assert decoder.pending == 3
    assert decoder.feed(frame[3:512]) == []
    assert decoder.feed(frame[512:]) == [(codec.EXECCMD, b"x" * 1000)]
    assert decoder.pending == 0


def test_merged_frames_come_out_in_order():
    decoder = codec.CtlDecoder()
    data = codec.encode_ctl(codec.PING) + codec.encode_ctl(codec.ACK, b"ok") + codec.encode_ctl(codec.READY)
    assert decoder.feed(data) == [(codec.PING, b""), (codec.ACK, b"ok"), (codec.READY, b"")]


def test_truncated_frame_stays_pending():
    decoder = codec.StreamDecoder()
    frame = codec.encode_stream(7, b"hello")
    assert decoder.feed(frame[:-1]) == []
    assert decoder.pending == len(frame) - 1


def test_length_below_header_is_malformed():
    with pytest.raises(codec.FrameError):
        codec.CtlDecoder().feed(struct.pack(">II", codec.PING, 7))
    with pytest.raises(codec.FrameError):
        codec.StreamDecoder().feed(struct.pack(">QI", 1, 11))


def test_absurd_length_is_malformed_before_the_body_arrives():
    with pytest.raises(codec.FrameError):
        codec.CtlDecoder().feed(struct.pack(">II", codec.PING, codec.MAX_FRAME + 1))


def test_empty_stream_frame_is_eof():
    assert codec.StreamDecoder().feed(codec.encode_stream(3)) == [(3, b"")]


ctl_frames = st.lists(st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=700)), max_size=8)
stream_frames = st.lists(st.tuples(st.integers(0, 2**64 - 1), st.binary(max_size=700)), max_size=8)


def _split(data, cuts):
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points + [len(data)]:
        pieces.append(data[last:p])
        last = p
    return pieces


@settings(max_examples=200, deadline=None)
@given(frames=ctl_frames, cuts=st.lists(st.integers(0, 10**6), max_size=12))
def test_ctl_frames_survive_any_split(frames, cuts):
    data = b"".join(codec.encode_ctl(code, payload) for code, payload in frames)
    decoder = codec.CtlDecoder()
    out = []
    for piece in _split(data, cuts):
        out += decoder.feed(piece)
    assert out == frames
    assert decoder.pending == 0


@settings(max_examples=200, deadline=None)
@given(frames=stream_frames, cuts=st.lists(st.integers(0, 10**6), max_size=12))
def test_stream_frames_survive_any_split(frames, cuts):
    data = b"".join(codec.encode_stream(seq, payload) for seq, payload in frames)
    decoder = codec.StreamDecoder()
    out = []
    for piece in _split(data, cuts):
        out += decoder.feed(piece)
    assert out == frames


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=64))
def test_garbage_either_decodes_waits_or_raises_frame_error(garbage):
    decoder = codec.CtlDecoder()
    try:
        frames = decoder.feed(garbage)
    except codec.FrameError:
        return
    consumed = sum(8 + len(payload) for _, payload in frames)
    assert consumed + decoder.pending == len(garbage)
