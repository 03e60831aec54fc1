"""The sans-I/O frame parser and builders: bytes in, events out, no socket."""

from __future__ import annotations

import functools
import struct

import pytest

from tests.support import raw
from tests.support.raw import close_payload
from wsserver import framing
from wsserver.framing import Close, Failure, FrameParser
from wsserver.ratelimit import TokenBucket

MASK = b"\x37\xfa\x21\x3d"


#: Client frames with a fixed masking key, so every run feeds the parser the same bytes.
client_frame = functools.partial(raw.client_frame, mask=MASK)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def parse(data: bytes, **kwargs: object) -> list[framing.Event]:
    parser = FrameParser(max_message_size=kwargs.pop("max_size", 1000), **kwargs)  # type: ignore[arg-type]
    return parser.feed(data)


def describe(events: list[framing.Event]) -> list[object]:
    return [repr(event) if not isinstance(event, str | bytes | int) else event for event in events]


T, B, C, P = framing.OP_TEXT, framing.OP_BINARY, framing.OP_CONTINUATION, framing.OP_PING

CASES = [
    # (name, wire bytes, expected events)
    ("text", client_frame(T, b"hello"), ["hello"]),
    ("empty text", client_frame(T), [""]),
    ("binary", client_frame(B, b"\x00\xff"), [b"\x00\xff"]),
    ("two pipelined", client_frame(T, b"a") + client_frame(B, b"b"), ["a", b"b"]),
    ("ping", client_frame(P, b"x"), ["Ping(b'x')"]),
    ("pong", client_frame(framing.OP_PONG, b"y"), ["Pong(b'y')"]),
    (
        "fragmented text with a ping between",
        client_frame(T, b"he", fin=False) + client_frame(P) + client_frame(C, b"llo"),
        ["Ping(b'')", "hello"],
    ),
    (
        "fragmented binary",
        client_frame(B, b"a", fin=False) + client_frame(C, b"", fin=False) + client_frame(C, b"b"),
        [b"ab"],
    ),
    (
        "utf-8 split across fragments",
        client_frame(T, "é".encode()[:1], fin=False) + client_frame(C, "é".encode()[1:]),
        ["é"],
    ),
    ("16-bit length", client_frame(T, b"x" * 300), ["x" * 300]),
    ("close without code", client_frame(framing.OP_CLOSE), ["Close(1005, '')"]),
    (
        "close with code and reason",
        client_frame(framing.OP_CLOSE, close_payload(1000, b"bye")),
        ["Close(1000, 'bye')"],
    ),
    ("close 3000", client_frame(framing.OP_CLOSE, close_payload(3000)), ["Close(3000, '')"]),
    ("close 4999", client_frame(framing.OP_CLOSE, close_payload(4999)), ["Close(4999, '')"]),
    ("nothing after close", client_frame(framing.OP_CLOSE) + client_frame(T, b"x"),
     ["Close(1005, '')"]),
    # failures
    ("unmasked", client_frame(T, b"x", masked=False), [1002]),
    ("rsv1", client_frame(T, b"x", rsv=0x40), [1002]),
    ("rsv3", client_frame(T, b"x", rsv=0x10), [1002]),
    ("opcode 3", client_frame(3), [1002]),
    ("opcode 11", client_frame(11), [1002]),
    ("fragmented ping", client_frame(P, fin=False), [1002]),
    ("ping of 126 bytes", client_frame(P, b"x" * 126), [1002]),
    ("continuation first", client_frame(C, b"x"), [1002]),
    ("text inside fragments", client_frame(T, b"a", fin=False) + client_frame(T, b"b"), [1002]),
    ("close of one byte", client_frame(framing.OP_CLOSE, b"\x03"), [1002]),
    ("close reason not utf-8", client_frame(framing.OP_CLOSE, close_payload(1000, b"\xff")),
     [1007]),
    ("invalid utf-8", client_frame(T, b"\xce\xba\xff"), [1007]),
    ("invalid utf-8 in a fragment",
     client_frame(T, b"ok", fin=False) + client_frame(C, b"\xff", fin=False), [1007]),
    ("truncated utf-8 at the end", client_frame(T, b"a", fin=False) + client_frame(C, b"\xce"),
     [1007]),
    ("too big", client_frame(T, b"x" * 1001), [1009]),
    ("too big by its header alone", client_frame(B, length=1 << 40), [1009]),
    ("too big across fragments",
     client_frame(B, b"x" * 600, fin=False) + client_frame(C, b"x" * 401), [1009]),
    ("events before the failure are kept", client_frame(T, b"a") + client_frame(T, masked=False),
     ["a", 1002]),
]


@pytest.mark.parametrize("wire, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
@pytest.mark.parametrize("chunking", ["whole", "bytewise"])
def test_parse(wire: bytes, expected: list[object], chunking: str) -> None:
    parser = FrameParser(max_message_size=1000)
    events: list[framing.Event] = []
    if chunking == "whole":
        events = parser.feed(wire)
    else:
        for i in range(len(wire)):
            events += parser.feed(wire[i : i + 1])
            if parser.done:
                break
    got = [int(e.code) if isinstance(e, Failure) else e for e in events]
    assert describe(got) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "code",
    [0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535],
)
def test_invalid_close_codes_fail_with_1002(code: int) -> None:
    (event,) = parse(client_frame(framing.OP_CLOSE, close_payload(code)))
    assert isinstance(event, Failure) and event.code == 1002


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1011, 1014, 3000, 4001, 4999])
def test_valid_close_codes_are_reported(code: int) -> None:
    (event,) = parse(client_frame(framing.OP_CLOSE, close_payload(code)))
    assert isinstance(event, Close) and event.code == code


def test_invalid_utf8_fails_before_the_frame_is_complete() -> None:
    parser = FrameParser(max_message_size=1000)
    wire = client_frame(T, b"valid " + b"\xff" + b"x" * 100)
    # Header and the bad byte, not the rest: the failure must not wait for it.
    events = parser.feed(wire[:10]) + parser.feed(wire[10:14])
    assert [type(e) for e in events] == [Failure]
    assert events[0].code == 1007  # type: ignore[union-attr]


def test_invalid_utf8_in_a_partial_continuation_fails_fast() -> None:
    parser = FrameParser(max_message_size=1000)
    assert parser.feed(client_frame(T, "é".encode()[:1], fin=False)) == []
    wire = client_frame(C, b"\x41" + b"y" * 50)  # 0x41 cannot continue 0xC3
    (event,) = parser.feed(wire[:7])
    assert isinstance(event, Failure) and event.code == 1007


def test_valid_utf8_split_inside_a_frame_is_delivered() -> None:
    text = "κόσμε" * 40
    wire = client_frame(T, text.encode())
    parser = FrameParser(max_message_size=1000)
    events: list[framing.Event] = []
    for i in range(0, len(wire), 7):
        events += parser.feed(wire[i : i + 7])
    assert events == [text]


def test_frame_budget_counts_control_and_continuation_frames() -> None:
    clock = FakeClock()
    parser = FrameParser(1000, frame_budget=TokenBucket(10, 3, clock), clock=clock)
    wire = client_frame(P) + client_frame(T, b"a", fin=False) + client_frame(C, fin=False)
    assert describe(parser.feed(wire)) == ["Ping(b'')"]
    (event,) = parser.feed(client_frame(framing.OP_PONG))
    assert isinstance(event, Failure) and event.code == 1008


def test_frame_budget_refills() -> None:
    clock = FakeClock()
    parser = FrameParser(1000, frame_budget=TokenBucket(10, 2, clock), clock=clock)
    assert len(parser.feed(client_frame(P) * 2)) == 2
    clock.now += 0.1
    assert describe(parser.feed(client_frame(P))) == ["Ping(b'')"]


def test_unfinished_fragmented_message_times_out() -> None:
    clock = FakeClock()
    parser = FrameParser(1000, fragment_timeout=5.0, clock=clock)
    parser.feed(client_frame(T, b"a", fin=False))
    assert parser.fragment_started == 100.0
    assert not parser.fragment_expired(104.9)
    assert parser.fragment_expired(105.0)
    clock.now = 105.0
    (event,) = parser.feed(client_frame(P))
    assert isinstance(event, Failure) and event.code == 1008


def test_finished_fragmented_message_clears_the_deadline() -> None:
    clock = FakeClock()
    parser = FrameParser(1000, fragment_timeout=5.0, clock=clock)
    parser.feed(client_frame(B, b"a", fin=False) + client_frame(C, b"b"))
    assert parser.fragment_started is None
    assert not parser.fragment_expired(1e9)


def test_large_message_in_many_reads_is_joined_once() -> None:
    payload = bytes(range(256)) * 1024
    wire = client_frame(B, payload)
    parser = FrameParser(max_message_size=1 << 20)
    events: list[framing.Event] = []
    for i in range(0, len(wire), 1000):
        events += parser.feed(wire[i : i + 1000])
    assert events == [payload]


@pytest.mark.parametrize(
    "build, expected",
    [
        (lambda: framing.text_frame("hi"), b"\x81\x02hi"),
        (lambda: framing.binary_frame(b"\x00"), b"\x82\x01\x00"),
        (lambda: framing.pong_frame(b"p"), b"\x8a\x01p"),
        (lambda: framing.ping_frame(), b"\x89\x00"),
        (lambda: framing.close_frame(1000, "ok"), b"\x88\x04\x03\xe8ok"),
        (lambda: framing.close_frame(None), b"\x88\x00"),
        (lambda: framing.build_frame(framing.OP_TEXT, b"x" * 126)[:4], b"\x81\x7e\x00\x7e"),
        (lambda: framing.build_frame(framing.OP_TEXT, b"x" * 65536)[:10],
         b"\x81\x7f" + (65536).to_bytes(8, "big")),
    ],
)
def test_builders(build: object, expected: bytes) -> None:
    assert build() == expected  # type: ignore[operator]


def test_close_reason_is_cut_on_a_character_boundary() -> None:
    frame = framing.close_frame(1000, "é" * 100)
    assert len(frame) == 2 + 125 - 1  # 123 bytes of reason hold 61 whole "é"
    frame[4:].decode("utf-8")


def test_masks_agree() -> None:
    data = bytes(range(256)) * 5 + b"abc"
    assert framing.unmask(data, MASK) == framing._mask_python(data, MASK)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 200_000])
def test_text_message_header_and_payload(size: int) -> None:
    """A server message's frame: FIN + text, never masked, the shortest length form."""
    payload = b"x" * size
    frame = framing.text_message(payload)
    assert frame[0] == 0x81
    length = frame[1]
    assert length & 0x80 == 0
    if size < 126:
        assert length == size
        offset = 2
    elif size <= 0xFFFF:
        assert length == 126
        assert struct.unpack("!H", frame[2:4])[0] == size
        offset = 4
    else:
        assert length == 127
        assert struct.unpack("!Q", frame[2:10])[0] == size
        offset = 10
    assert frame[offset:] == payload


@pytest.mark.parametrize("cut", [2, 3, 6, 7], ids=["2 bytes", "3 bytes", "header", "header+1"])
def test_invalid_utf8_fails_fast_when_the_header_came_alone(cut: int) -> None:
    """Autobahn 6.4.3 over TLS: each write is a record, so a frame's header
    can arrive without any of its payload (or cut inside the header). The
    payload is still validated as it comes: the invalid part fails at once,
    not when the frame is complete."""
    payload = bytes.fromhex("cebae1bdb9cf83cebcceb5") + bytes.fromhex("f4908080") + b"edited"
    wire = client_frame(T, payload)
    parser = FrameParser(max_message_size=1000)
    assert parser.feed(wire[:cut]) == []
    assert parser.feed(wire[cut:6 + 11]) == []  # the valid start of the payload
    events = parser.feed(wire[6 + 11 : 6 + 15])  # the invalid sequence, frame unfinished
    assert [type(e) for e in events] == [Failure] and events[0].code == 1007  # type: ignore[union-attr]


def test_a_long_text_frames_split_header_still_fails_fast() -> None:
    payload = b"a" * 200 + b"\xff" + b"b" * 100  # a 16-bit length: an 8-byte header
    wire = client_frame(T, payload)
    parser = FrameParser(max_message_size=1000)
    assert parser.feed(wire[:3]) == []
    assert parser.feed(wire[3:8]) == []
    events = parser.feed(wire[8 : 8 + 201])
    assert [type(e) for e in events] == [Failure]
