"""HTTP streaming's wire format: events, the close event, session ids (no sockets)."""

from __future__ import annotations

import json

import pytest

from wsserver.edge.sse import KEEPALIVE, SESSION_ID, chunk, close_event, event, event_chunk
from wsserver.transport import Prepared


def parse(stream: bytes) -> list[str]:
    """The data of each event in ``stream``, as an EventSource joins it (the
    HTML standard's "interpret an event stream", for the fields the server uses)."""
    events, data = [], []
    for line in stream.decode().split("\n"):
        if line == "":
            if data:
                events.append("\n".join(data))
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    return events


def test_an_event_carries_the_message_json_as_it_is() -> None:
    payload = b'{"type":"message","room":"r","data":"caf\xc3\xa9 : \\n"}'
    assert event(payload) == b"data: " + payload + b"\n\n"
    assert parse(event(payload)) == [payload.decode()]


@pytest.mark.parametrize("payload", [b'{"a":\n1}', b'{"a":\r\n1}', b'{"a":\r1,\n"b":2}'])
def test_line_breaks_become_data_lines_and_the_json_survives(payload: bytes) -> None:
    encoded = event(payload)
    assert encoded.count(b"\n\n") == 1 and encoded.endswith(b"\n\n")
    assert b"\r" not in encoded
    (data,) = parse(encoded)
    assert json.loads(data) == json.loads(payload)


def test_the_close_event() -> None:
    (data,) = parse(close_event(4001, 'token "expired"'))
    assert json.loads(data) == {"type": "close", "code": 4001, "reason": 'token "expired"'}


def test_keepalive_is_a_comment_no_client_sees_as_an_event() -> None:
    assert KEEPALIVE.startswith(b":") and parse(KEEPALIVE) == []


def test_a_fan_out_builds_the_event_once() -> None:
    message = Prepared(b'{"type":"message"}')
    assert message.encoded(event_chunk) is message.encoded(event_chunk)


def dechunk(body: bytes) -> bytes:
    """A chunked body's data (RFC 9112 section 7.1), for the test's own check."""
    data = b""
    while body:
        size_line, body = body.split(b"\r\n", 1)
        size = int(size_line, 16)
        data, body = data + body[:size], body[size:]
        assert body[:2] == b"\r\n"
        body = body[2:]
    return data


def test_an_http11_stream_writes_each_event_as_a_chunk() -> None:
    payload = b'{"type":"echo","data":"' + b"x" * 300 + b'"}'
    framed = event_chunk(payload)
    assert framed.startswith(b"%x\r\n" % len(event(payload)))
    # Several framed events in one write are several chunks: the same events.
    assert dechunk(framed + chunk(KEEPALIVE) + framed) == event(payload) + KEEPALIVE + event(payload)


@pytest.mark.parametrize(
    ("session", "valid"),
    [
        ("AbCd_-12." + "x" * 43, True),
        ("AbCd_-12." + "x" * 42, False),
        ("AbCd_-1." + "x" * 43, False),
        ("AbCd_-12:" + "x" * 43, False),
        ("AbCd_-12." + "x" * 42 + "!", False),
        ("", False),
    ],
)
def test_session_ids(session: str, valid: bool) -> None:
    assert bool(SESSION_ID.fullmatch(session)) is valid
