"""The compression rows' raw client: frames parsed and inflated as RFC 6455/7692 say.

Pure code, no sockets: frames are built here by hand (and deflated with zlib
the way a server does), fed in pieces, and the messages and wire sizes that
come out are checked.
"""

from __future__ import annotations

import json
import struct
import zlib

import pytest

from bench import payloads
from bench.wire import (
    TAIL,
    Deflate,
    FrameReader,
    ProtocolError,
    accept_for,
    encode_frame,
    handshake_request,
    parse_response_head,
)


def frame(payload: bytes, opcode: int = 0x1, fin: bool = True, rsv1: bool = False) -> bytes:
    """A server frame (unmasked)."""
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", first, n) + payload
    if n < 1 << 16:
        return struct.pack("!BBH", first, 126, n) + payload
    return struct.pack("!BBQ", first, 127, n) + payload


def deflate(data: bytes, compressor: zlib._Compress | None = None) -> bytes:
    """One message compressed as permessage-deflate sends it (the tail stripped)."""
    compressor = compressor or zlib.compressobj(wbits=-15)
    out = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(TAIL)
    return out[: -len(TAIL)]


def test_plain_messages_of_every_length_encoding_byte_by_byte() -> None:
    reader = FrameReader()
    bodies = [b"hi", b"x" * 200, b"y" * 70_000]
    wire = b"".join(frame(b) for b in bodies)
    got = []
    for i in range(len(wire)):
        got += reader.feed(wire[i : i + 1])
    assert [m.payload for m in got] == bodies
    assert [m.wire_bytes for m in got] == [2 + 2, 4 + 200, 10 + 70_000]
    assert not any(m.compressed for m in got)


def test_fragments_are_joined_and_control_frames_pass_between_them() -> None:
    reader = FrameReader()
    wire = frame(b"hel", fin=False) + frame(b"", opcode=0x9) + frame(b"lo", opcode=0x0)
    got = reader.feed(wire)
    assert [(m.opcode, m.payload) for m in got] == [(0x9, b""), (0x1, b"hello")]
    assert got[1].wire_bytes == 5 + 4


def test_compressed_messages_are_inflated_without_context_takeover() -> None:
    reader = FrameReader(Deflate(server_no_context_takeover=True, server_max_window_bits=15))
    text = json.dumps(payloads.dashboard_update(3)).encode()
    body = deflate(text)
    got = reader.feed(frame(body, rsv1=True) + frame(body, rsv1=True) + frame(b"plain"))
    assert [m.payload for m in got] == [text, text, b"plain"]
    assert [m.compressed for m in got] == [True, True, False]
    assert got[0].wire_bytes == len(frame(body)) < len(text)


def test_context_takeover_keeps_the_inflater_between_messages() -> None:
    compressor = zlib.compressobj(wbits=-15)
    text = b'{"type":"message","room":"r","data":"the same again"}'
    first, second = deflate(text, compressor), deflate(text, compressor)
    # The second refers back to the first: shorter, and unreadable on its own.
    assert len(second) < len(first)
    reader = FrameReader(Deflate(server_no_context_takeover=False, server_max_window_bits=15))
    got = reader.feed(frame(first, rsv1=True) + frame(second, rsv1=True))
    assert [m.payload for m in got] == [text, text]
    fresh = FrameReader(Deflate(server_no_context_takeover=True, server_max_window_bits=15))
    with pytest.raises(zlib.error):
        fresh.feed(frame(second, rsv1=True))


@pytest.mark.parametrize(
    ("wire", "deflating"),
    [
        (frame(b"x", rsv1=True), False),  # RSV1 when nothing was negotiated
        (bytes([0x81, 0x81]) + b"mask" + b"x", True),  # a masked server frame
        (frame(b"", opcode=0x9, fin=False), True),  # a fragmented control frame
        (frame(b"x", opcode=0x0), True),  # a continuation with nothing to continue
        (bytes([0xA1, 0x00]), True),  # RSV2
    ],
)
def test_protocol_errors_are_reported(wire: bytes, deflating: bool) -> None:
    reader = FrameReader(Deflate(True, 15) if deflating else None)
    with pytest.raises(ProtocolError):
        reader.feed(wire)


def test_the_servers_extension_answer_is_parsed() -> None:
    assert Deflate.parse(None) is None
    assert Deflate.parse("") is None
    assert Deflate.parse("x-webkit-deflate-frame") is None
    assert Deflate.parse("permessage-deflate") == Deflate(False, 15)
    parsed = Deflate.parse(
        "foo, permessage-deflate; server_no_context_takeover; server_max_window_bits=10"
    )
    assert parsed == Deflate(True, 10)
    assert Deflate.parse('permessage-deflate; server_max_window_bits="12"') == Deflate(False, 12)


def test_client_frames_are_masked_and_round_trip() -> None:
    mask = b"\x01\x02\x03\x04"
    for body in (b"", b"abc", b"z" * 300, b"q" * 70_000):
        out = encode_frame(0x1, body, mask)
        assert out[0] == 0x81 and out[1] & 0x80
        header = 2 if len(body) < 126 else 4 if len(body) < 1 << 16 else 10
        assert out[header : header + 4] == mask
        unmasked = bytes(b ^ mask[i % 4] for i, b in enumerate(out[header + 4 :]))
        assert unmasked == body


def test_handshake_offers_deflate_only_when_asked_and_accept_is_rfc_6455s() -> None:
    request, key = handshake_request("ws://127.0.0.1:9/ws", {"Authorization": "Bearer t"}, True)
    text = request.decode()
    assert text.startswith("GET /ws HTTP/1.1\r\nHost: 127.0.0.1:9\r\n")
    assert "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n" in text
    assert f"Sec-WebSocket-Key: {key}\r\n" in text and text.endswith("Bearer t\r\n\r\n")
    plain, _ = handshake_request("ws://127.0.0.1:9/ws", {}, False)
    assert b"Extensions" not in plain
    # RFC 6455 section 1.3's example.
    assert accept_for("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    status, headers = parse_response_head(
        b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Extensions: permessage-deflate"
    )
    assert status == 101 and headers == {"sec-websocket-extensions": "permessage-deflate"}


def test_payloads_have_the_sizes_the_rows_name_and_repeat_per_seed() -> None:
    def size(data: object) -> int:
        return len(json.dumps(data, separators=(",", ":")))

    assert 1000 <= size(payloads.dashboard_update(0)) <= 2000
    assert 130 <= size(payloads.chat_line(0)) <= 170
    assert payloads.dashboard_update(5) == payloads.dashboard_update(5)
    assert payloads.dashboard_update(5) != payloads.dashboard_update(6)
    for target in (64, 128, 256, 512, 1024, 2048, 4096):
        assert 0.7 * target <= size(payloads.sized(1, target)) <= 1.3 * target
