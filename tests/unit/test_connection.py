"""The sans-I/O connection: its State, and the closing handshake, without a socket."""

from __future__ import annotations

import functools

import pytest

from tests.support import raw
from wsserver import framing
from wsserver.closecodes import CloseCode
from wsserver.connection import Ending, ServerConnection, State
from wsserver.deflate import Deflate
from wsserver.framing import Close, Failure, FrameParser, Ping
from wsserver.transport import Prepared

client_frame = functools.partial(raw.client_frame, mask=b"\x01\x02\x03\x04")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def opened(**kw: object) -> ServerConnection:
    connection = ServerConnection(FrameParser(1000, **kw))  # type: ignore[arg-type]
    assert connection.state is State.CONNECTING
    assert connection.accepted(True) is None
    assert connection.state is State.OPEN
    return connection


def test_connecting_then_open_then_closing_then_closed_when_the_client_closes() -> None:
    connection = opened()
    assert connection.delivers and connection.can_send
    (close,) = connection.receive_data(client_frame(framing.OP_CLOSE, b"\x0b\xb9bye"))
    assert isinstance(close, Close)
    # Answered with the client's code (RFC 6455 section 5.5.1), then TCP closes.
    assert connection.close_received_frame(close) == framing.close_frame(3001, "")
    assert connection.state is State.CLOSING and connection.ending is Ending.CLOSE
    assert not connection.delivers and not connection.can_send
    assert connection.connection_lost(False) == (3001, "bye", False)
    assert connection.state is State.CLOSED


def test_an_empty_close_is_answered_by_an_empty_close() -> None:
    connection = opened()
    (close,) = connection.receive_data(client_frame(framing.OP_CLOSE))
    assert connection.close_received_frame(close) == framing.close_frame(None)  # type: ignore[arg-type]
    assert connection.connection_lost(False) == (1005, "", False)


def test_the_server_closing_first_waits_for_the_client_and_keeps_its_code() -> None:
    connection = opened()
    assert connection.close(4000, "asked to") == framing.close_frame(4000, "asked to")
    assert connection.state is State.CLOSING and connection.ending is Ending.AWAIT_CLOSE
    assert connection.close(4001, "again") is None  # one close frame only
    # The client's answer is not answered again, and the server's code stands.
    (close,) = connection.receive_data(client_frame(framing.OP_CLOSE, b"\x0f\xa0"))
    assert connection.close_received_frame(close) is None  # type: ignore[arg-type]
    assert connection.ending is Ending.CLOSE
    assert connection.connection_lost(False) == (4000, "asked to", True)


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000])
def test_a_forbidden_close_code_fails_with_1002(code: int) -> None:
    connection = opened()
    (failure,) = connection.receive_data(client_frame(framing.OP_CLOSE, code.to_bytes(2, "big")))
    assert isinstance(failure, Failure) and failure.code == CloseCode.PROTOCOL_ERROR
    frame = connection.failed(failure)
    assert frame is not None and frame[2:4] == (1002).to_bytes(2, "big")
    assert connection.ending is Ending.LINGER
    assert connection.connection_lost(False)[:2] == (1002, f"invalid close code {code}")


def test_a_failure_after_the_servers_close_sends_no_second_close_frame() -> None:
    connection = opened()
    connection.close(1001, "going away")
    assert connection.failed(Failure(CloseCode.TOO_BIG, "message too big")) is None
    assert connection.ending is Ending.LINGER
    assert connection.connection_lost(False) == (1001, "going away", True)


def test_pings_are_answered_while_open_only() -> None:
    connection = opened()
    assert connection.ping_received(b"x") == framing.pong_frame(b"x")
    connection.close(1000, "")
    assert connection.ping_received(b"x") is None


def test_refused_in_open_lingers_and_a_silent_open_is_closed_with_1011() -> None:
    refused = ServerConnection(FrameParser(1000))
    assert refused.close(4001, "token") is not None  # open() refused it
    assert refused.accepted(False) is None
    assert refused.state is State.CLOSING and refused.ending is Ending.LINGER

    silent = ServerConnection(FrameParser(1000))
    frame = silent.accepted(False)  # open() neither accepted nor closed
    assert frame == framing.close_frame(CloseCode.INTERNAL, "")
    assert silent.ending is Ending.LINGER


def test_closed_in_open_but_kept_waits_for_the_clients_close() -> None:
    connection = ServerConnection(FrameParser(1000))
    connection.close(4008, "too many")
    assert connection.accepted(True) is None
    assert connection.state is State.CLOSING and connection.ending is Ending.AWAIT_CLOSE


def test_no_close_frame_either_way_is_1006_by_whoever_cut() -> None:
    assert opened().connection_lost(True) == (1006, "", True)
    assert opened().connection_lost(False) == (1006, "", False)


def test_an_unfinished_fragmented_message_expires_with_1008() -> None:
    clock = Clock()
    connection = opened(fragment_timeout=1.0, clock=clock)
    connection.receive_data(client_frame(framing.OP_TEXT, b"part", fin=False))
    assert connection.fragment_expired(0.5) is None
    frame = connection.fragment_expired(1.0)
    assert frame is not None and frame[2:4] == (1008).to_bytes(2, "big")
    assert connection.ending is Ending.LINGER
    assert connection.receive_data(client_frame(framing.OP_CONTINUATION, b"late")) == []


def test_events_come_back_in_wire_order_for_the_caller_to_act_on() -> None:
    connection = opened()
    wire = (client_frame(framing.OP_TEXT, b"a") + client_frame(framing.OP_PING, b"p")
            + client_frame(framing.OP_CLOSE, b"\x03\xe8") + client_frame(framing.OP_TEXT, b"z"))
    events = connection.receive_data(wire)
    assert [type(e) for e in events] == [str, Ping, Close]  # nothing after a close


def test_the_encoding_follows_the_negotiation_and_the_threshold() -> None:
    plain = ServerConnection(FrameParser(1000))
    assert plain.encoding(10_000) is framing.text_message
    compressing = ServerConnection(FrameParser(1000), Deflate(), compression_threshold=256)
    assert compressing.encoding(255) is framing.text_message
    assert compressing.encoding(256) is framing.deflated_text_message
    narrow = ServerConnection(FrameParser(1000), Deflate(server_window_bits=10))
    assert narrow.encoding(1000) is framing.DEFLATED_TEXT[10]
    # One Prepared, one compressed frame for every connection with that window.
    message = Prepared(b'{"type":"message","data":"' + b"x" * 500 + b'"}')
    a = message.encoded(compressing.encoding(len(message)))
    b = message.encoded(ServerConnection(FrameParser(1000), Deflate()).encoding(len(message)))
    assert a is b and a[0] & 0x40
