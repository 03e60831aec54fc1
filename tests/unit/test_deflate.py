"""permessage-deflate without I/O: negotiation, compression once, bounded inflation."""

from __future__ import annotations

import functools
import tracemalloc
import zlib

import pytest

from tests.support import raw
from wsserver import deflate, framing
from wsserver.closecodes import CloseCode
from wsserver.deflate import Deflate, Inflater
from wsserver.framing import Failure, FrameParser

client_frame = functools.partial(raw.client_frame, mask=b"\x37\xfa\x21\x3d")
RSV1 = 0x40
T, B, C = framing.OP_TEXT, framing.OP_BINARY, framing.OP_CONTINUATION


def client_deflate(data: bytes, wbits: int = 15) -> bytes:
    """What a client sends for ``data``: raw deflate, sync-flushed, tail stripped."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, -wbits)
    out = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def server_inflate(frame: bytes) -> bytes:
    """The payload of an unmasked server frame, inflated as a client does."""
    length = frame[1] & 0x7F
    start = 2 if length < 126 else 4 if length == 126 else 10
    return zlib.decompressobj(-15).decompress(frame[start:] + b"\x00\x00\xff\xff")


# --- negotiation (RFC 7692 section 7.1) -------------------------------------------

NEGOTIATION = [
    # (offer header, expected response or None when declined, negotiated parameters)
    ("permessage-deflate", "permessage-deflate; server_no_context_takeover", Deflate()),
    ("permessage-deflate; client_max_window_bits",
     "permessage-deflate; server_no_context_takeover; client_max_window_bits=15", Deflate()),
    ("permessage-deflate; client_max_window_bits=10",
     "permessage-deflate; server_no_context_takeover; client_max_window_bits=10",
     Deflate(client_window_bits=10)),
    ("permessage-deflate; server_max_window_bits=10",
     "permessage-deflate; server_no_context_takeover; server_max_window_bits=10",
     Deflate(server_window_bits=10)),
    ("permessage-deflate; server_max_window_bits=8",
     "permessage-deflate; server_no_context_takeover; server_max_window_bits=8",
     Deflate(server_window_bits=8)),
    ("permessage-deflate; client_no_context_takeover",
     "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
     Deflate(client_no_context_takeover=True)),
    ("permessage-deflate; server_no_context_takeover",
     "permessage-deflate; server_no_context_takeover", Deflate()),
    ('permessage-deflate; client_max_window_bits="12"',
     "permessage-deflate; server_no_context_takeover; client_max_window_bits=12",
     Deflate(client_window_bits=12)),
    # Declined offers fall through to the next one (section 5).
    ("permessage-deflate; server_max_window_bits=16, permessage-deflate",
     "permessage-deflate; server_no_context_takeover", Deflate()),
    ("x-webkit-deflate-frame, permessage-deflate; client_max_window_bits",
     "permessage-deflate; server_no_context_takeover; client_max_window_bits=15", Deflate()),
    # Declined outright.
    ("permessage-deflate; server_max_window_bits", None, None),  # needs a value
    ("permessage-deflate; server_max_window_bits=7", None, None),
    ("permessage-deflate; client_max_window_bits=99", None, None),
    ("permessage-deflate; client_no_context_takeover=1", None, None),
    ("permessage-deflate; unknown_param", None, None),
    ("permessage-deflate; client_no_context_takeover; client_no_context_takeover", None, None),
    ("x-webkit-deflate-frame", None, None),
    ("", None, None),
]


@pytest.mark.parametrize("offer, response, negotiated", NEGOTIATION,
                         ids=[case[0] or "none" for case in NEGOTIATION])
def test_negotiation(offer: str, response: str | None, negotiated: Deflate | None) -> None:
    accepted = deflate.negotiate(offer)
    if response is None:
        assert accepted is None
    else:
        assert accepted == (negotiated, response)


# --- compression: once per message, no context ---------------------------------------


def test_a_message_is_compressed_with_no_context_from_the_one_before() -> None:
    message = b'{"type":"message","data":"' + b"dashboard " * 60 + b'"}'
    first = framing.deflated_text_message(message)
    second = framing.deflated_text_message(message)
    # server_no_context_takeover: the second refers to nothing in the first,
    # so each inflates alone (a fresh decompressor per message).
    assert first == second
    assert first[0] == 0x80 | RSV1 | T
    assert server_inflate(first) == message
    assert len(first) < len(message) / 3


def test_a_narrow_window_still_inflates_within_that_window() -> None:
    message = bytes(range(256)) * 40
    frame = framing.DEFLATED_TEXT[8](message)
    # zlib refuses an 8-bit raw window; a 9-bit one never reaches back further.
    length = frame[1] & 0x7F
    start = 2 if length < 126 else 4
    body = frame[start:] + b"\x00\x00\xff\xff"
    assert zlib.decompressobj(-8).decompress(body) == message


# --- inflation --------------------------------------------------------------------


def compressed_frame(data: bytes, opcode: int = T, **kw: object) -> bytes:
    return client_frame(opcode, client_deflate(data), rsv=RSV1, **kw)  # type: ignore[arg-type]


def parser(max_size: int = 1000, **kw: object) -> FrameParser:
    return FrameParser(max_size, inflater=Inflater(**kw))  # type: ignore[arg-type]


def test_compressed_messages_are_inflated_and_plain_ones_pass_as_they_are() -> None:
    p = parser()
    assert p.feed(compressed_frame("héllo".encode()) + client_frame(T, b"plain")) == [
        "héllo", "plain"
    ]
    assert p.feed(compressed_frame(b"\x00\xff", B)) == [b"\x00\xff"]


def test_a_fragmented_compressed_message_is_inflated_across_its_frames() -> None:
    data = client_deflate(b"fragmented " * 20)
    wire = (client_frame(T, data[:5], fin=False, rsv=RSV1)
            + client_frame(C, data[5:9], fin=False)
            + client_frame(C, data[9:]))
    assert parser().feed(wire) == ["fragmented " * 20]


def test_the_clients_context_carries_over_between_its_messages() -> None:
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    frames = []
    for _ in range(3):
        out = compressor.compress(b"same words again") + compressor.flush(zlib.Z_SYNC_FLUSH)
        frames.append(client_frame(T, out[:-4], rsv=RSV1))
    # The second and third refer back to the first: one decompressor for all.
    assert parser().feed(b"".join(frames)) == ["same words again"] * 3


def test_client_no_context_takeover_gets_a_fresh_decompressor_per_message() -> None:
    inflater = Inflater(no_context_takeover=True)
    p = FrameParser(1000, inflater=inflater)
    assert p.feed(compressed_frame(b"one")) == ["one"]
    assert inflater._decompressor is None  # nothing kept between messages


@pytest.mark.parametrize("wire, reason", [
    (client_frame(T, b"x", rsv=0x20), "RSV2"),
    (client_frame(framing.OP_PING, b"", rsv=RSV1), "RSV1 on a control frame"),
    (client_frame(T, b"a", fin=False) + client_frame(C, b"b", rsv=RSV1), "RSV1 on a continuation"),
])
def test_reserved_bits_outside_a_compressed_messages_first_frame_fail_1002(
    wire: bytes, reason: str
) -> None:
    events = parser().feed(wire)
    assert isinstance(events[-1], Failure) and events[-1].code == CloseCode.PROTOCOL_ERROR


def test_rsv1_without_the_extension_fails_1002() -> None:
    events = FrameParser(1000).feed(compressed_frame(b"hello"))
    assert isinstance(events[0], Failure) and events[0].code == CloseCode.PROTOCOL_ERROR


def test_invalid_compressed_data_fails_1007() -> None:
    events = parser().feed(client_frame(T, b"\xff\xff\xff\xff", rsv=RSV1))
    assert isinstance(events[0], Failure) and events[0].code == CloseCode.INVALID_DATA


def test_invalid_utf8_once_inflated_fails_1007() -> None:
    events = parser().feed(compressed_frame(b"ok \xff"))
    assert isinstance(events[0], Failure) and events[0].code == CloseCode.INVALID_DATA


def test_a_message_that_inflates_past_the_limit_fails_1009() -> None:
    events = parser(max_size=1000).feed(compressed_frame(b"a" * 1001))
    assert isinstance(events[0], Failure) and events[0].code == CloseCode.TOO_BIG
    assert parser(max_size=1001).feed(compressed_frame(b"a" * 1001)) == ["a" * 1001]


def test_fragments_that_inflate_past_the_limit_together_fail_1009() -> None:
    data = client_deflate(b"b" * 3000)
    middle = len(data) // 2
    wire = client_frame(B, data[:middle], fin=False, rsv=RSV1) + client_frame(C, data[middle:])
    events = parser(max_size=2000).feed(wire)
    assert isinstance(events[-1], Failure) and events[-1].code == CloseCode.TOO_BIG


def test_a_zip_bomb_is_refused_without_inflating_the_rest() -> None:
    """100 MiB of zeros compress to about 100 KiB: the frame passes the size
    check on the wire, and inflating it whole would take 100 MiB. Inflation
    stops one byte past the limit: the parser's peak allocation stays near
    the limit, not near the bomb."""
    # Sync-flushed raw deflate streams concatenate: 100 x 1 MiB of zeros.
    bomb = (client_deflate(b"\0" * (1 << 20)) + b"\x00\x00\xff\xff") * 100
    bomb = bomb[:-4]
    assert len(bomb) < 200_000
    check = zlib.decompressobj(-15)
    assert len(check.decompress(bomb, 10 << 20)) == 10 << 20 and check.unconsumed_tail
    limit = 256 * 1024
    p = parser(max_size=limit)
    wire = client_frame(B, bomb, rsv=RSV1)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        baseline = tracemalloc.get_traced_memory()[0]
        events = p.feed(wire)
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    assert isinstance(events[0], Failure) and events[0].code == CloseCode.TOO_BIG
    # The wire bytes (unmasked copy included) and the limit, with room to spare;
    # inflating the bomb would have taken 100 MiB.
    assert peak < 4 * len(wire) + 4 * limit, peak
