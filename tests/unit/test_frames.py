"""Pre-built frames match what Tornado's own framing produces (RFC 6455 5.2)."""

import struct

import pytest

from wsserver.frames import text_frame


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 200_000])
def test_header_and_payload(size: int) -> None:
    payload = b"x" * size
    frame = text_frame(payload)
    assert frame[0] == 0x81  # FIN + text
    length = frame[1]
    assert length & 0x80 == 0  # servers never mask
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
