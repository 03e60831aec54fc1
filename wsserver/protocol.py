"""The message protocol: parse and validate client messages, encode replies.

Pure functions over text and dicts. Every way a client message can be wrong
ends in :class:`~wsserver.errors.BadRequest` or
:class:`~wsserver.errors.UnknownType`, never in another exception.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from wsserver.errors import BadRequest, UnknownType

MAX_DEPTH = 32
MAX_ROOM_LENGTH = 128
MAX_ID_LENGTH = 128
#: The largest offset a ``since`` may name: offsets are 64-bit signed in every
#: broker (Redis stream IDs and counters), so a larger one was never given out.
MAX_OFFSET = 2**63 - 1
MAX_METHOD_LENGTH = 128
#: The longest ``idempotency_key`` of a publish (client or server API).
MAX_IDEMPOTENCY_KEY = 128

MessageId = str | int | float


@dataclass(frozen=True, slots=True)
class ClientMessage:
    """One validated client message: its ``type``, ``id`` and whole body."""

    type: str
    id: MessageId | None
    body: dict[str, Any]

    def field(self, name: str) -> Any:
        """A field the validation already made sure is present."""
        return self.body[name]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    # 1e400 parses to inf, which no reply can carry (RFC 8259 has no infinity).
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} is out of range")
    return value


#: A ``\uD800``-``\uDFFF`` escape: the only way a lone surrogate, which UTF-8
#: cannot encode, gets into a decoded string (frames are valid UTF-8 already).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")

_decoder = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def decode(text: str) -> Any:
    """JSON-decode ``text``, refusing NaN/Infinity, absurd nesting and huge integers.

    Raises:
        BadRequest: the text is not acceptable JSON.
    """
    # Counting brackets is cheap next to parsing; walk the tree only when deep
    # nesting is possible at all.
    try:
        value = _decoder.decode(text)
    except RecursionError:
        raise BadRequest("JSON nested too deeply") from None
    except ValueError as exc:
        # json.JSONDecodeError, NaN/Infinity, and integers past Python's
        # int_max_str_digits all arrive here.
        raise BadRequest(f"not valid JSON: {_short(exc)}") from None
    if text.count("[") + text.count("{") > MAX_DEPTH and _depth(value) > MAX_DEPTH:
        raise BadRequest(f"JSON nested deeper than {MAX_DEPTH} levels")
    # Escaped surrogate pairs are joined by the decoder; only a lone one is
    # left unencodable, and it would fail every reply that echoes it.
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
        raise BadRequest("strings must be valid Unicode: one holds a lone UTF-16 surrogate")
    return value


def _decode_lenient(text: str) -> Any:
    """:func:`decode` without the surrogate check (for :func:`salvage_id`)."""
    try:
        return _decoder.decode(text)
    except (RecursionError, ValueError):
        return None


def _has_lone_surrogate(value: Any) -> bool:
    stack: list[Any] = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def _depth(value: Any) -> int:
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        elif not isinstance(node, list):
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in node if isinstance(child, dict | list))
    return deepest


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= 120 else text[:117] + "..."


def salvage_id(text: str) -> MessageId | None:
    """The ``id`` of a message, if it is readable, for replies to a bad message."""
    value = _decode_lenient(text)
    if isinstance(value, dict):
        candidate = value.get("id")
        if _valid_id(candidate):
            return candidate
    return None


def _valid_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, str):
        return len(value) <= MAX_ID_LENGTH and not _has_lone_surrogate(value)
    # Non-finite floats never get here: the decoder refuses them.
    return isinstance(value, int | float)


def parse(text: str) -> ClientMessage:
    """Parse and validate one client text frame.

    Raises:
        BadRequest: not JSON, not an object, or missing/wrongly typed fields.
        UnknownType: a well-formed message of a type the server does not know.
    """
    value = decode(text)
    if not isinstance(value, dict):
        raise BadRequest("a message is a JSON object")
    msg_id = value.get("id")
    if msg_id is not None and not _valid_id(msg_id):
        raise BadRequest(f"id must be a string (at most {MAX_ID_LENGTH} characters) or a number")
    msg_type = value.get("type")
    if not isinstance(msg_type, str):
        raise BadRequest("'type' is required and must be a string")
    if msg_type not in MESSAGE_TYPES:
        raise UnknownType(f"unknown message type {msg_type[:64]!r}")
    MESSAGES[msg_type](value)
    return ClientMessage(msg_type, msg_id, value)


def _require_room(body: dict[str, Any]) -> None:
    room = body.get("room")
    if not isinstance(room, str) or not 1 <= len(room) <= MAX_ROOM_LENGTH:
        raise BadRequest(f"'room' must be a string of 1 to {MAX_ROOM_LENGTH} characters")


def _require_data(body: dict[str, Any]) -> None:
    if "data" not in body:
        raise BadRequest("'data' is required")


def _validate_nothing(body: dict[str, Any]) -> None:
    pass


def _validate_join(body: dict[str, Any]) -> None:
    _require_room(body)
    token = body.get("token")
    if token is not None and (not isinstance(token, str) or not token):
        raise BadRequest("'token' (a subscription token) must be a non-empty string")
    since = body.get("since")
    if since is None:
        return
    if not isinstance(since, dict):
        raise BadRequest("'since' must be an object {\"offset\": O, \"epoch\": E}")
    offset, epoch = since.get("offset"), since.get("epoch")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= MAX_OFFSET:
        raise BadRequest("'since.offset' must be an integer from 0 to 2^63 - 1")
    if not isinstance(epoch, str) or not 1 <= len(epoch) <= 64:
        raise BadRequest("'since.epoch' must be a string of 1 to 64 characters")


def _validate_publish(body: dict[str, Any]) -> None:
    _require_room(body)
    _require_data(body)
    key = body.get("idempotency_key")
    if key is not None and (not isinstance(key, str) or not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY):
        raise BadRequest(
            f"'idempotency_key' must be a string of 1 to {MAX_IDEMPOTENCY_KEY} characters")


def client_idempotency_key(user: str, key: str) -> str:
    """The broker's key for a client's ``idempotency_key``: one user's keys never
    meet another's (the user's length is in it), and the server API's only if
    the backend sends a key that starts with a NUL on purpose."""
    return f"\0{len(user)}:{user}:{key}"


def _validate_rpc(body: dict[str, Any]) -> None:
    method = body.get("method")
    if not isinstance(method, str) or not 1 <= len(method) <= MAX_METHOD_LENGTH:
        raise BadRequest(f"'method' is required: a string of 1 to {MAX_METHOD_LENGTH} characters")


def _validate_task(body: dict[str, Any]) -> None:
    if not isinstance(body.get("name"), str):
        raise BadRequest("'name' is required and must be a string")
    if not isinstance(body.get("args", {}), dict):
        raise BadRequest("'args' must be an object")


def _validate_refresh(body: dict[str, Any]) -> None:
    token = body.get("token")
    if not isinstance(token, str) or not token:
        raise BadRequest("'token' is required and must be a string")


#: Every client message type and its validator: the one table the parser and
#: the session's dispatch (``Session._on_<type>``) are built from.
MESSAGES: dict[str, Callable[[dict[str, Any]], None]] = {
    "ping": _validate_nothing,
    "echo": _require_data,
    "join": _validate_join,
    "leave": _require_room,
    "publish": _validate_publish,
    "presence": _require_room,
    "task": _validate_task,
    "refresh": _validate_refresh,
    "rpc": _validate_rpc,
}
MESSAGE_TYPES = frozenset(MESSAGES)


def encode(message: dict[str, Any]) -> bytes:
    """A server message as compact UTF-8 JSON."""
    return _encoder.encode(message).encode("utf-8")


class RawJSONList(list[bytes]):
    """A list of already-encoded JSON values, spliced in by :func:`encode_with_raw`."""


def encode_with_raw(message: dict[str, Any]) -> bytes:
    """:func:`encode`, with top-level :class:`RawJSONList` values spliced in as they
    are: recovered messages are not decoded and encoded again.

    Only for server-built replies whose other values are strings and numbers: a
    key's marker cannot then occur anywhere else in the encoded text (a quote
    inside a string value is always escaped).
    """
    raw = {key: value for key, value in message.items() if isinstance(value, RawJSONList)}
    if not raw:
        return encode(message)
    out = encode({key: ([] if key in raw else value) for key, value in message.items()})
    for key, items in raw.items():
        marker = b'"%s":[]' % key.encode()
        out = out.replace(marker, b'"%s":[%s]' % (key.encode(), b",".join(items)), 1)
    return out
