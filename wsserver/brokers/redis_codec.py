"""The Redis broker's wire format: script arguments and answers, pub/sub envelopes.

Pure (no redis-py, no I/O): what :class:`~wsserver.brokers.redis.RedisBroker`
sends to the scripts of :mod:`wsserver.brokers.redis_scripts` is built here
from broker values, and what they answer becomes broker values here.
"""

from __future__ import annotations

import json
from typing import Any

from wsserver.brokers.base import (
    IDEMPOTENCY_TTL,
    HistoryPage,
    HistorySpec,
    NodeInfo,
    NodeStats,
    Publication,
    PublishResult,
    RoomCount,
)
from wsserver.brokers.memory import new_epoch


def ms(seconds: float) -> int:
    """``seconds`` in whole milliseconds, at least 1 (Redis TTLs)."""
    return max(1, round(seconds * 1000))


# --- pub/sub envelopes ----------------------------------------------------------


def encode_origin(origin: str | None) -> bytes:
    """The origin part of a pub/sub envelope: ``-`` or its byte length, a space, itself."""
    if origin is None:
        return b"- "
    raw = origin.encode()
    return b"%d %s" % (len(raw), raw)


def decode_envelope(room: str, data: bytes) -> Publication:
    """A publication from its pub/sub envelope.

    The envelope is ``OFFSET SP EPOCH SP ORIGIN-LENGTH SP ORIGIN PAYLOAD``,
    offset and epoch empty without history, origin length ``-`` for none
    (written by the publish script and :func:`encode_origin`).
    """
    offset, epoch, length, rest = data.split(b" ", 3)
    origin: str | None = None
    if length != b"-":
        size = int(length)
        origin = rest[:size].decode()
        rest = rest[size:]
    return Publication(
        room, rest, int(offset) if offset else None, epoch.decode() if epoch else None, origin
    )


# --- publications and history ---------------------------------------------------


def publish_args(
    channel: bytes, message: bytes, history: HistorySpec | None, origin: str | None,
    idempotent: bool,
) -> list[Any]:
    """ARGV of the PUBLISH script (its comment lists them)."""
    keep = history is not None and history.size > 0
    return [
        channel,
        message,
        encode_origin(origin),
        history.size if keep and history is not None else 0,
        ms(history.ttl) if keep and history is not None else 0,
        new_epoch() if keep else "",
        ms(IDEMPOTENCY_TTL),
        "1" if keep else "0",
        "1" if idempotent else "0",
        origin or "",
    ]


def publish_result(answer: bytes) -> PublishResult:
    """PUBLISH's answer: ``""`` without history, else ``OFFSET EPOCH``; with a
    leading ``=`` when the idempotency key was seen (a duplicate)."""
    duplicate = answer.startswith(b"=")
    if duplicate:
        answer = answer[1:]
    if not answer:
        return PublishResult(duplicate=duplicate)
    offset, epoch = answer.split(b" ", 1)
    return PublishResult(int(offset), epoch.decode(), duplicate)


def history_args(history: HistorySpec, since: int | None, limit: int | None) -> list[Any]:
    """ARGV of the HISTORY script: ttl, epoch candidate, first stream ID, count."""
    # Stream IDs are unsigned 64-bit: a since past any offset ever given reads nothing.
    first = "" if since is None else (
        "-" if since < 0 else f"{min(since + 1, 2**64 - 1)}-0")
    count = "" if limit is None or since is None else str(limit + 1)
    return [ms(history.ttl), new_epoch(), first, count]


def history_page(
    room: str, answer: list[Any], since: int | None, limit: int | None
) -> HistoryPage:
    """HISTORY's answer (epoch, top offset, stream entries) as a page after ``since``."""
    epoch, top = answer[0].decode(), int(answer[1])
    if since is None:
        return HistoryPage(epoch, top)
    kept = []
    for entry_id, flat in answer[2]:
        offset = int(entry_id.split(b"-", 1)[0])
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        origin = fields.get(b"o")
        kept.append(Publication(
            room, fields[b"d"], offset, epoch, None if origin is None else origin.decode()
        ))
    # Complete when nothing between since and the first kept one is gone.
    complete = since >= top or (bool(kept) and kept[0].offset == since + 1)
    if limit is not None and len(kept) > limit:
        kept = kept[:limit]
        complete = False
    return HistoryPage(epoch, top, kept, complete and since <= top)


def reset_epoch_args(stale: str, history: HistorySpec) -> list[Any]:
    """ARGV of the RESET_EPOCH script: the stale epoch, a new one, the ttl."""
    return [stale, new_epoch(), ms(history.ttl)]


def epoch_answer(answer: Any) -> str:
    """RESET_EPOCH's answer: the room's epoch afterwards."""
    return str(answer.decode() if isinstance(answer, bytes) else answer)


# --- presence, users, nodes -----------------------------------------------------


def room_counts(flat: list[bytes]) -> dict[str, RoomCount]:
    """ROOMS's answer: ``ROOM CONNECTIONS USERS`` triples."""
    return {
        flat[i].decode(): RoomCount(int(flat[i + 1]), int(flat[i + 2]))
        for i in range(0, len(flat), 3)
    }


def heartbeat_body(stats: NodeStats) -> str:
    """What a node's heartbeat stores about it (``/api/nodes`` reads it back)."""
    return json.dumps({"connections": stats.connections, "users": stats.users,
                       "uptime": stats.uptime, **stats.extra})


def node_infos(flat: list[Any]) -> dict[str, NodeInfo]:
    """NODES's answer: Redis's time (ms), then ``NAME STATS-JSON AT-MS`` triples.

    A node's uptime is what it reported plus the time since its heartbeat.
    """
    now = int(flat[0])
    found: dict[str, NodeInfo] = {}
    for i in range(1, len(flat), 3):
        name = flat[i].decode()
        stats = json.loads(flat[i + 1])
        since_beat = max(0.0, (now - int(flat[i + 2])) / 1000)
        found[name] = NodeInfo(
            name, int(stats["connections"]), int(stats["users"]),
            float(stats["uptime"]) + since_beat,
        )
    return found


def disconnect_message(node: str, user: str, code: int, reason: str) -> str:
    """The control message asking every node to close ``user``'s connections."""
    return json.dumps({"t": "disconnect", "n": node, "u": user, "c": code, "r": reason})
