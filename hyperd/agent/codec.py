"""The wire format of hyperstart's protocol (API 4244), shared by the host and the guest.

Standard library only: the guest agent imports this module inside the VM.

Control channel (``sh.hyper.channel.0``): ``[code u32 BE][length u32 BE, header included][payload]``.
Stream channel (``sh.hyper.channel.1``): ``[seq u64 BE][length u32 BE, header included][data]``;
an empty frame is the end of that stream.
"""

import struct

API_VERSION = 4244

CTL_CHANNEL = "sh.hyper.channel.0"
STREAM_CHANNEL = "sh.hyper.channel.1"

# Control codes (hyperstart:src/api.h).
GETVERSION = 0
STARTPOD = 1
DESTROYPOD = 4
EXECCMD = 6
READY = 8
ACK = 9
ERROR = 10
WINSIZE = 11
PING = 12
NEXT = 14
WRITEFILE = 15
READFILE = 16
NEWCONTAINER = 17
KILLCONTAINER = 18
ONLINECPUMEM = 19
SETUPINTERFACE = 20
SETUPROUTE = 21
REMOVECONTAINER = 22
PROCESSASYNCEVENT = 23
SIGNALPROCESS = 24
DELETEINTERFACE = 25

CODE_NAMES = {
    value: name
    for name, value in dict(globals()).items()
    if name.isupper() and isinstance(value, int) and name not in ("API_VERSION",)
}

CTL_HEADER = struct.Struct(">II")
STREAM_HEADER = struct.Struct(">QI")

#: The host writes control messages in chunks of at most this many bytes, each acknowledged by NEXT.
CTL_CHUNK = 512

#: No sane message is larger than this; a bigger length means a corrupt or hostile stream.
MAX_FRAME = 64 * 1024 * 1024


class FrameError(ValueError):
    """A frame that cannot be decoded: the channel is out of step."""


def encode_ctl(code: int, payload: bytes = b"") -> bytes:
    return CTL_HEADER.pack(code, CTL_HEADER.size + len(payload)) + payload


def encode_stream(seq: int, data: bytes = b"") -> bytes:
    return STREAM_HEADER.pack(seq, STREAM_HEADER.size + len(data)) + data


def encode_next(count: int) -> bytes:
    return encode_ctl(NEXT, struct.pack(">I", count))


def decode_u32(payload: bytes) -> int:
    if len(payload) != 4:
        raise FrameError("expected a 4-byte integer, got %d bytes" % len(payload))
    return struct.unpack(">I", payload)[0]


class _Decoder:
    """Accumulates bytes and yields whole frames, however the bytes were split or merged."""

    header: struct.Struct

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list:
        """Add ``data``; return the frames now complete, as ``(key, payload)`` tuples.

        Raises FrameError when a header announces an impossible length; the decoder is then unusable.
        """
        self._buffer += data
        frames = []
        size = self.header.size
        while len(self._buffer) >= size:
            key, length = self.header.unpack_from(self._buffer)
            if length < size or length > MAX_FRAME:
                raise FrameError("frame length %d out of range" % length)
            if len(self._buffer) < length:
                break
            frames.append((key, bytes(self._buffer[size:length])))
            del self._buffer[:length]
        return frames

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole frame."""
        return len(self._buffer)


class CtlDecoder(_Decoder):
    header = CTL_HEADER


class StreamDecoder(_Decoder):
    header = STREAM_HEADER
