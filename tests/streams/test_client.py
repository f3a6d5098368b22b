"""The client stream protocol against a real daemon: 1 MB of random bytes through `cat` and back, byte-exact,
stdin and output flowing at once; the frame decoder on split and merged reads."""

from __future__ import annotations

import os
import struct

import pytest
import pytest_twisted

from hyperd.client.streams import FrameDecoder

pytestmark = pytest.mark.timeout(180)


@pytest_twisted.ensureDeferred
async def test_one_megabyte_of_random_bytes_round_trips_byte_exact(vm_daemon):
    from twisted.internet import reactor

    from hyperd.client import HyperClient
    from hyperd.client.streams import StreamClient

    vm_daemon.api.run_pod("box", ["sleep", "3600"])
    client = HyperClient(reactor, vm_daemon.socket_path)
    try:
        streams = StreamClient(client)
        exec_id = await streams.exec_create("box", ["cat"])
        received = {1: bytearray(), 2: bytearray(), 3: bytearray()}
        proto = await streams.exec_start("box", exec_id, lambda s, d: received[s].extend(d))
        data = os.urandom(1024 * 1024)
        for i in range(0, len(data), 100_000):
            proto.write(data[i:i + 100_000])
        proto.close_stdin()
        await proto.done
        assert bytes(received[2]) == b"" and bytes(received[3]) == b""
        assert len(received[1]) == len(data) and bytes(received[1]) == data
        assert await streams.exit_code("box", exec_id) == 0
    finally:
        await client.close()


def test_frame_decoder_handles_split_and_merged_frames():
    frames = [(1, b"hello"), (2, b""), (2, b"x" * 70000), (3, b"boom\n")]
    wire = b"".join(struct.pack(">BxxxL", s, len(p)) + p for s, p in frames)
    for step in (1, 3, 7, 8, 9, 4096, len(wire)):
        decoder, out = FrameDecoder(), []
        for i in range(0, len(wire), step):
            out += decoder.feed(wire[i:i + step])
        assert out == frames and decoder.pending == 0
