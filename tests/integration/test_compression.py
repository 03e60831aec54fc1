"""permessage-deflate on the real server: negotiation, the threshold, fan-out
compressed once, and inflation bounded by --max-message-size."""

from __future__ import annotations

import json
import tracemalloc
import zlib
from typing import Any

import pytest

from tests.support.clients import welcomed
from tests.support.raw import OP_CLOSE, RawConnection, client_frame, raw_connect
from tests.support.tokens import bearer, mint
from wsserver import deflate
from wsserver.framing import OP_BINARY, OP_TEXT

OFFER = {"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"}
BIG = "dashboard " * 60  # well over the 256-byte threshold once in a JSON reply


def inflate(payload: bytes) -> bytes:
    """A server message's payload inflated as a client does (no context kept)."""
    return zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")


def client_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    return (compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


async def next_message(conn: RawConnection) -> tuple[bool, dict[str, Any]]:
    """The next text message: whether it came compressed, and its JSON."""
    frame = await conn.read_frame()
    assert frame.opcode == OP_TEXT, frame
    compressed = conn.last_rsv1
    payload = inflate(frame.payload) if compressed else frame.payload
    return compressed, json.loads(payload)


async def upgraded(port: int, offer: dict[str, str] | None) -> RawConnection:
    conn = await raw_connect(port, {**bearer(mint("alice")), **(offer or {})})
    assert conn.status == 101
    compressed, welcome = await next_message(conn)
    assert welcome["type"] == "welcome" and not compressed  # under the threshold
    return conn


@pytest.mark.gen_test
async def test_offered_deflate_is_accepted_and_big_replies_go_compressed(port: int) -> None:
    conn = await upgraded(port, OFFER)
    assert conn.headers["sec-websocket-extensions"] == (
        "permessage-deflate; server_no_context_takeover; client_max_window_bits=15"
    )
    # The client may compress too (RSV1 on its first frame), or not.
    message = json.dumps({"type": "echo", "data": BIG, "id": 1}).encode()
    await conn.send(client_frame(OP_TEXT, client_deflate(message), rsv=0x40))
    compressed, reply = await next_message(conn)
    assert compressed and reply == {"type": "echo", "data": BIG, "id": 1}
    await conn.send(client_frame(OP_TEXT, json.dumps({"type": "echo", "data": "hi"}).encode()))
    compressed, reply = await next_message(conn)
    assert not compressed and reply == {"type": "echo", "data": "hi"}  # under the threshold


@pytest.mark.gen_test
async def test_no_offer_no_compression(port: int) -> None:
    conn = await upgraded(port, None)
    assert "sec-websocket-extensions" not in conn.headers
    await conn.send(client_frame(OP_TEXT, json.dumps({"type": "echo", "data": BIG}).encode()))
    compressed, reply = await next_message(conn)
    assert not compressed and reply["data"] == BIG


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [{"compression": "off"}])
async def test_compression_off_declines_the_offer(port: int) -> None:
    conn = await upgraded(port, OFFER)
    assert "sec-websocket-extensions" not in conn.headers
    await conn.send(client_frame(OP_TEXT, json.dumps({"type": "echo", "data": BIG}).encode()))
    compressed, reply = await next_message(conn)
    assert not compressed and reply["data"] == BIG
    # Without the extension, RSV1 is a protocol error.
    await conn.send(client_frame(OP_TEXT, client_deflate(b'{"type":"ping"}'), rsv=0x40))
    assert (await conn.read_until_close())[0] == 1002


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [{"compression_threshold": "2000"}])
async def test_the_threshold_is_a_setting(port: int) -> None:
    conn = await upgraded(port, OFFER)
    await conn.send(client_frame(OP_TEXT, json.dumps({"type": "echo", "data": BIG}).encode()))
    compressed, reply = await next_message(conn)
    assert not compressed and reply["data"] == BIG  # about 640 bytes: under 2000
    bigger = BIG * 4
    await conn.send(client_frame(OP_TEXT, json.dumps({"type": "echo", "data": bigger}).encode()))
    compressed, reply = await next_message(conn)
    assert compressed and reply["data"] == bigger  # about 2,430 bytes: over it


@pytest.mark.gen_test
async def test_a_room_message_is_compressed_once_for_every_compressing_member(
    port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = deflate.compress

    def counting(payload: bytes, wbits: int = 15) -> bytes:
        calls.append(len(payload))
        return real(payload, wbits)

    monkeypatch.setattr(deflate, "compress", counting)
    # websockets offers permessage-deflate; Tornado's client offers nothing.
    members = [await welcomed(port, mint(f"user{i}"), library="websockets") for i in range(3)]
    plain = await welcomed(port, mint("plain"))
    for member in [*members, plain]:
        await member.ask({"type": "join", "room": "dash"})
    calls.clear()
    await plain.send({"type": "publish", "room": "dash", "data": BIG})
    for member in [*members, plain]:
        message = await member.recv()
        assert message is not None and message["data"] == BIG
    assert len(calls) == 1  # one compression, three compressed deliveries
    calls.clear()
    await plain.send({"type": "publish", "room": "dash", "data": "short"})
    for member in [*members, plain]:
        message = await member.recv()
        assert message is not None and message["data"] == "short"
    assert calls == []  # under the threshold: nothing compressed


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("server_flags", [{"max_message_size": "65536"}])
async def test_a_zip_bomb_closes_1009_without_being_inflated(port: int) -> None:
    # 100 MiB of zeros in about 100 KiB: over the limit only once inflated.
    chunk = client_deflate(b"\0" * (1 << 20)) + b"\x00\x00\xff\xff"
    bomb = (chunk * 100)[:-4]
    assert len(bomb) < 65536 * 2
    frames = client_frame(OP_BINARY, bomb[:60000], rsv=0x40, fin=False) + client_frame(
        0, bomb[60000:]
    )
    conn = await upgraded(port, OFFER)
    tracemalloc.start()
    try:
        await conn.send(frames)
        close = await conn.read_frame()
        while close.opcode != OP_CLOSE:
            close = await conn.read_frame()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # The code and reason docs/protocol.md lists, whether the size showed before or after inflating.
    assert close.close_code == 1009
    assert close.payload[2:] == b"message too big"
    # The server (this process) inflated no more than the limit, not 100 MiB.
    assert peak < 8 << 20, peak
