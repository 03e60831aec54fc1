"""The Redis broker's pure parts: script arguments and answers, key names (no Redis)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from wsserver.brokers.base import HistoryPage, HistorySpec, NodeInfo, NodeStats, Publication
from wsserver.brokers.redis_codec import (
    disconnect_message,
    heartbeat_body,
    history_args,
    history_page,
    ms,
    node_infos,
    publish_args,
    publish_result,
    room_counts,
)
from wsserver.brokers.redis_keys import KeySpace

KEEP = HistorySpec(size=10, ttl=60)


def test_the_codec_and_key_names_load_no_redis_client() -> None:
    code = ("import sys, wsserver.brokers.redis_codec, wsserver.brokers.redis_keys; "
            "print('redis' in sys.modules)")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, timeout=30)
    assert found.stdout.strip() == "False"


def test_publish_args_with_and_without_history() -> None:
    args = publish_args(b"p:room:r", b"{}", KEEP, "o 1", idempotent=True)
    assert args[:5] == [b"p:room:r", b"{}", b"3 o 1", 10, 60_000]
    assert args[5]  # an epoch candidate
    assert args[6:] == [300_000, "1", "1", "o 1"]
    plain = publish_args(b"c", b"{}", None, None, idempotent=False)
    assert plain == [b"c", b"{}", b"- ", 0, 0, "", 300_000, "0", "0", ""]
    # A namespace with size 0 keeps no history.
    assert publish_args(b"c", b"{}", HistorySpec(0, 60), None, False)[7] == "0"


@pytest.mark.parametrize(
    ("answer", "offset", "epoch", "duplicate"),
    [(b"", None, None, False), (b"7 abc", 7, "abc", False), (b"=", None, None, True),
     (b"=7 abc", 7, "abc", True)],
)
def test_publish_result(answer: bytes, offset: int | None, epoch: str | None,
                        duplicate: bool) -> None:
    result = publish_result(answer)
    assert (result.offset, result.epoch, result.duplicate) == (offset, epoch, duplicate)


@pytest.mark.parametrize(
    ("since", "limit", "first", "count"),
    [
        (None, None, "", ""),
        (None, 5, "", ""),  # a limit means nothing without since
        (-1, None, "-", ""),
        (0, 3, "1-0", "4"),  # one more than the limit: is the page cut?
        (2**64, None, f"{2**64 - 1}-0", ""),
    ],
)
def test_history_args(since: int | None, limit: int | None, first: str, count: str) -> None:
    args = history_args(KEEP, since, limit)
    assert (args[0], args[2], args[3]) == (60_000, first, count)


def entry(offset: int, data: bytes, origin: bytes | None = None) -> list[Any]:
    flat = [b"d", data] if origin is None else [b"d", data, b"o", origin]
    return [b"%d-0" % offset, flat]


@pytest.mark.parametrize(
    ("answer", "since", "limit", "offsets", "complete"),
    [
        ([b"e", b"3", [entry(1, b"a"), entry(2, b"b"), entry(3, b"c")]], 0, None, [1, 2, 3], True),
        ([b"e", b"3", [entry(2, b"b"), entry(3, b"c")]], 0, None, [2, 3], False),  # 1 trimmed
        ([b"e", b"3", [entry(2, b"b"), entry(3, b"c")]], 1, None, [2, 3], True),
        ([b"e", b"3", []], 3, None, [], True),  # nothing missed
        ([b"e", b"3", []], 1, None, [], False),  # expired
        ([b"e", b"3", []], 5, None, [], False),  # past the top: Redis went back in time
        ([b"e", b"3", [entry(1, b"a"), entry(2, b"b"), entry(3, b"c")]], 0, 2, [1, 2], False),
    ],
)
def test_history_page(
    answer: list[Any], since: int, limit: int | None, offsets: list[int], complete: bool
) -> None:
    page = history_page("r", answer, since, limit)
    assert (page.epoch, page.offset) == ("e", 3)
    assert [p.offset for p in page.publications] == offsets
    assert page.complete is complete


def test_history_page_keeps_the_origin_and_answers_the_position_alone() -> None:
    page = history_page("r", [b"e", b"1", [entry(1, b"{}", b"o")]], 0, None)
    assert page.publications == [Publication("r", b"{}", 1, "e", "o")]
    assert history_page("r", [b"e", b"9"], None, None) == HistoryPage("e", 9)


def test_rooms_and_nodes_answers() -> None:
    counts = room_counts([b"a", b"3", b"2", b"b", b"1", b"1"])
    assert {name: (c.connections, c.users) for name, c in counts.items()} == {
        "a": (3, 2), "b": (1, 1)
    }
    body = heartbeat_body(NodeStats(5, 2, 10.0, {"worker": 1}))
    assert json.loads(body) == {"connections": 5, "users": 2, "uptime": 10.0, "worker": 1}
    # Redis's clock 2.5 s after the node's heartbeat: its uptime grew by as much.
    found = node_infos([b"12500", b"n1", body.encode(), b"10000"])
    assert found == {"n1": NodeInfo("n1", 5, 2, 12.5)}


def test_ms_is_never_zero() -> None:
    assert (ms(0.0001), ms(1.5), ms(300)) == (1, 1500, 300_000)


def test_disconnect_message() -> None:
    assert json.loads(disconnect_message("n", "u", 4003, "bye")) == {
        "t": "disconnect", "n": "n", "u": "u", "c": 4003, "r": "bye"
    }


def test_key_names() -> None:
    keys = KeySpace("p", "n1")
    assert (keys.control, keys.probe) == (b"p:control", b"p:probe:n1")
    assert keys.room_channel("chat:1") == b"p:room:chat:1"
    assert keys.publish("r", None) == ["p:meta:r", "p:stream:r", ""]
    # The room's length first: room "a:b" key "c" and room "a" key "b:c" differ.
    assert keys.publish("a:b", "c")[2] != keys.publish("a", "b:c")[2]
    assert keys.presence("r") == ["p:pr:r", "p:pu:r", "p:rooms", "p:nr:n1"]
    assert keys.users == ["p:ut", "p:un:n1"]
    assert keys.heartbeat == ["p:nodes", "p:node:n1"]
    assert (keys.forward("Tg-1"), keys.ticket("t")) == (b"p:fwd:Tg-1", "p:ticket:t")
