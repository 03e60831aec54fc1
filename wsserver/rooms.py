"""Room names and who may join or publish: deny by default.

Pure policy, no I/O. Two sources decide (docs/protocol.md, "Rooms and
permissions"):

* :class:`Grants`, compiled once per token from its ``rooms`` (join, and read
  presence/history) and ``publish`` claims: exact names, or prefixes ending in
  ``*``. No other pattern syntax and never a regular expression built from a
  token, so a token cannot make matching slow.
* :class:`RoomPolicy`, built once at start from the config file's ``[rooms]``
  table: one :class:`NamespacePolicy` for the default namespace and one per
  declared namespace. The namespace's rule says which source counts: ``token``
  means the grants, ``anyone``/``owner``/``members``/``none`` do not look at
  them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Literal, get_args

from wsserver.errors import BadRequest, ConfigError, TokenInvalid

MAX_ROOM_LENGTH = 128
#: Grant entries per claim; a token listing more is a bug, not a use case.
MAX_GRANT_ENTRIES = 1000
#: A grant entry is a room name, or a room-name prefix plus its ``*``.
MAX_GRANT_LENGTH = MAX_ROOM_LENGTH + 1
MAX_HISTORY_SIZE = 10_000

_NAMESPACE = re.compile(r"[a-z0-9_-]{1,32}")

JoinRule = Literal["token", "anyone", "owner", "proxy", "none"]
PublishRule = Literal["token", "members", "proxy", "none"]
JOIN_RULES: tuple[str, ...] = get_args(JoinRule)
PUBLISH_RULES: tuple[str, ...] = get_args(PublishRule)


def is_namespace_name(name: str) -> bool:
    """True when ``name`` is a valid namespace name (``[a-z0-9_-]{1,32}``)."""
    # fullmatch, not match + "$": "$" also matches before a trailing newline.
    return _NAMESPACE.fullmatch(name) is not None


def validate_room(name: object) -> str:
    """``name`` when it is a valid room name.

    A room name is 1 to 128 printable characters (``str.isprintable``: the
    ASCII space is allowed; control, format, surrogate, private-use and
    unassigned code points and every other kind of space are not). When it
    holds a ``:``, the part before the first one is its namespace and must be
    ``[a-z0-9_-]{1,32}``.

    Raises:
        BadRequest: with a message saying what is wrong.
    """
    if not isinstance(name, str):
        raise BadRequest("'room' must be a string")
    if not 1 <= len(name) <= MAX_ROOM_LENGTH:
        raise BadRequest(f"'room' must be 1 to {MAX_ROOM_LENGTH} characters")
    if not name.isprintable():
        raise BadRequest("'room' must be printable characters (no control characters)")
    namespace, colon, _ = name.partition(":")
    if colon and not is_namespace_name(namespace):
        raise BadRequest("the room's namespace (before the first ':') must be [a-z0-9_-]{1,32}")
    return name


def namespace_of(room: str) -> str:
    """The namespace of a valid room name: the part before its first ``:``, or ""."""
    namespace, colon, _ = room.partition(":")
    return namespace if colon else ""


# --- grants: what a token allows ---------------------------------------------


@dataclass(frozen=True, slots=True)
class RoomPatterns:
    """One claim's entries, compiled: exact names, prefixes, or everything."""

    exact: frozenset[str] = frozenset()
    #: Prefixes without their ``*``; ``str.startswith`` takes the whole tuple.
    prefixes: tuple[str, ...] = ()
    everything: bool = False

    def matches(self, room: str) -> bool:
        """True when one entry covers ``room``."""
        return self.everything or room in self.exact or room.startswith(self.prefixes)

    @property
    def empty(self) -> bool:
        """True when nothing is granted."""
        return not (self.everything or self.exact or self.prefixes)


NO_PATTERNS = RoomPatterns()


def compile_patterns(value: object, claim: str) -> RoomPatterns:
    """The claim ``claim``'s value (a list of strings) compiled for matching.

    Raises:
        TokenInvalid: the value is not a list of at most 1000 well-formed
            entries. The reason is short and names the claim, never echoes
            the entry (it goes into a close frame).
    """
    if not isinstance(value, list):
        raise TokenInvalid(f"invalid token: '{claim}' must be a list of strings")
    if len(value) > MAX_GRANT_ENTRIES:
        raise TokenInvalid(f"invalid token: '{claim}' has more than {MAX_GRANT_ENTRIES} entries")
    for index, entry in enumerate(value):
        if not isinstance(entry, str):
            raise TokenInvalid(f"invalid token: '{claim}' entry {index} is not a string")
    compiled = _compile(tuple(value))
    if isinstance(compiled, RoomPatterns):
        return compiled
    index, problem = compiled
    raise TokenInvalid(f"invalid token: '{claim}' entry {index} {problem}")


def _entry_problem(entry: str) -> str | None:
    if not entry:
        return "is empty"
    if len(entry) > MAX_GRANT_LENGTH:
        return f"is longer than {MAX_GRANT_LENGTH} characters"
    if "*" in entry[:-1]:
        return "has a '*' before its end (only a trailing '*' is allowed)"
    name = entry[:-1] if entry.endswith("*") else entry
    if not name:
        return None  # a lone "*"
    if not name.isprintable():
        return "is not printable"
    namespace, colon, _ = name.partition(":")
    if colon and not is_namespace_name(namespace):
        return "has a namespace that is not [a-z0-9_-]{1,32}"
    if not entry.endswith("*") and len(entry) > MAX_ROOM_LENGTH:
        return f"is longer than {MAX_ROOM_LENGTH} characters"
    return None


# Many tokens carry the same lists ("chat:*"): check and compile them once.
# Tokens are signed and bounded by the header/message size caps, so the cache
# holds at most a few MB even with the largest tokens.
@lru_cache(maxsize=128)
def _compile(entries: tuple[str, ...]) -> RoomPatterns | tuple[int, str]:
    """The compiled entries, or the index of the first bad one and its problem."""
    for index, entry in enumerate(entries):
        problem = _entry_problem(entry)
        if problem:
            return index, problem
    if not entries:
        return NO_PATTERNS
    prefixes = sorted({entry[:-1] for entry in entries if entry.endswith("*")})
    if "" in prefixes:
        return RoomPatterns(everything=True)
    # Drop prefixes that a shorter one already covers ("chat:" covers "chat:a").
    kept: list[str] = []
    for prefix in prefixes:  # sorted, so a covering prefix comes first
        if not (kept and prefix.startswith(kept[-1])):
            kept.append(prefix)
    covering = tuple(kept)
    exact = frozenset(
        entry for entry in entries if not entry.endswith("*") and not entry.startswith(covering)
    )
    return RoomPatterns(exact=exact, prefixes=covering)


@dataclass(frozen=True, slots=True)
class Grants:
    """What a token allows: ``join`` from its ``rooms`` claim, ``publish`` from ``publish``."""

    join: RoomPatterns = NO_PATTERNS
    publish: RoomPatterns = NO_PATTERNS

    @classmethod
    def from_claims(cls, claims: Mapping[str, Any]) -> Grants:
        """The grants in a token's verified claims; absent claims grant nothing.

        Raises:
            TokenInvalid: a present ``rooms`` or ``publish`` claim is malformed
                (``null`` included: only an absent claim means "none").
        """
        if "rooms" not in claims and "publish" not in claims:
            return NO_GRANTS
        join = compile_patterns(claims["rooms"], "rooms") if "rooms" in claims else NO_PATTERNS
        publish = (
            compile_patterns(claims["publish"], "publish") if "publish" in claims else NO_PATTERNS
        )
        if join.empty and publish.empty:
            return NO_GRANTS
        return cls(join, publish)

    def can_join(self, room: str) -> bool:
        """True when the ``rooms`` claim covers ``room`` (join, presence, history)."""
        return self.join.matches(room)

    def can_publish(self, room: str) -> bool:
        """True when the ``publish`` claim covers ``room``."""
        return self.publish.matches(room)


#: The grants of a token without ``rooms``/``publish`` claims, shared by all.
NO_GRANTS = Grants()


# --- the namespace policies from the config file -----------------------------


@dataclass(frozen=True, slots=True)
class NamespacePolicy:
    """How one namespace's rooms behave; the defaults are the contract's ``[rooms]``.

    ``join``: ``token`` (the token's ``rooms`` grants), ``anyone`` (any
    authenticated user), ``owner`` (the user whose ``sub`` is the part after
    ``ns:``), ``proxy`` (the application's backend, asked per join) or ``none``
    (nobody; the server API only). ``publish``: ``token`` (the ``publish``
    grants), ``members`` (any member), ``proxy`` (the backend, asked per
    publish) or ``none``.
    """

    join: JoinRule = "token"
    publish: PublishRule = "token"
    #: Messages kept per room (0: no history).
    history_size: int = 0
    #: Seconds a room's history is kept after its last message.
    history_ttl: float = 300
    #: Members may ask who is in the room.
    presence: bool = False
    #: Members get ``user_joined`` / ``user_left`` events.
    join_leave: bool = False

    def __post_init__(self) -> None:
        problems = [
            f"{name}: {problem}"
            for name in _POLICY_KEYS
            if (problem := _value_problem(name, getattr(self, name)))
        ]
        if problems:
            raise ValueError("; ".join(problems))

    def describe(self) -> str:
        """A short summary for logs and ``check-config``."""
        parts = [f"join={self.join}", f"publish={self.publish}"]
        if self.history_size:
            parts.append(f"history={self.history_size}/{self.history_ttl:g}s")
        if self.presence:
            parts.append("presence")
        if self.join_leave:
            parts.append("join_leave")
        return " ".join(parts)


_POLICY_KEYS: tuple[str, ...] = tuple(f.name for f in fields(NamespacePolicy))


def _value_problem(name: str, value: object) -> str | None:
    """What is wrong with ``value`` for the policy key ``name``, or None."""
    if name in ("join", "publish"):
        rules = JOIN_RULES if name == "join" else PUBLISH_RULES
        if not isinstance(value, str):
            return f"expected a string ({_choices(rules)})"
        if value not in rules:
            return f"unknown value {value!r} (use {_choices(rules)})"
        return None
    if name == "history_size":
        if not isinstance(value, int) or isinstance(value, bool):
            return "expected an integer"
        if not 0 <= value <= MAX_HISTORY_SIZE:
            return f"must be 0..{MAX_HISTORY_SIZE}"
        return None
    if name == "history_ttl":
        if not isinstance(value, int | float) or isinstance(value, bool):
            return "expected a number of seconds"
        if not (value > 0 and math.isfinite(value)):
            return "must be a finite number of seconds above 0"
        return None
    # presence, join_leave
    if not isinstance(value, bool):
        return "expected true or false"
    return None


def _choices(rules: tuple[str, ...]) -> str:
    return ", ".join(rules[:-1]) + " or " + rules[-1]


class RoomPolicy:
    """The default namespace's policy plus the declared namespaces', built once.

    Immutable and hashable, so it can sit on the frozen ``Settings``.
    """

    __slots__ = ("_default", "_namespaces")

    def __init__(
        self,
        default: NamespacePolicy | None = None,
        namespaces: Mapping[str, NamespacePolicy] | None = None,
    ) -> None:
        bad = [name for name in namespaces or {} if not is_namespace_name(name)]
        if bad:
            raise ValueError(f"namespace names are [a-z0-9_-]{{1,32}}, not {bad[0]!r}")
        self._default = default or NamespacePolicy()
        self._namespaces: Mapping[str, NamespacePolicy] = MappingProxyType(
            dict(sorted((namespaces or {}).items()))
        )

    @classmethod
    def demo(cls) -> RoomPolicy:
        """Demo mode's policy: the default namespace open to any user, members
        publish; ``user:<sub>`` joined only by that user and written only by the
        server API (as the demo page's "My room" says)."""
        return cls(
            NamespacePolicy(join="anyone", publish="members"),
            {"user": NamespacePolicy(join="owner", publish="none")},
        )

    @property
    def default(self) -> NamespacePolicy:
        """The default namespace's policy (rooms without ``:``, undeclared namespaces)."""
        return self._default

    @property
    def namespaces(self) -> Mapping[str, NamespacePolicy]:
        """The declared namespaces' policies, by name (read-only)."""
        return self._namespaces

    def policy_for(self, room: str) -> NamespacePolicy:
        """The policy of ``room``'s namespace; an undeclared one follows the default."""
        namespace, colon, _ = room.partition(":")
        if not colon:
            return self.default
        return self._namespaces.get(namespace, self.default)

    def can_join(self, user: str, grants: Grants, room: str) -> bool:
        """True when ``user`` (a token's ``sub``) with ``grants`` may join ``room``.

        ``room`` must already be valid (:func:`validate_room`). With ``owner``,
        the owner of ``ns:rest`` is exactly ``rest`` (after the first ``:``, so
        a ``sub`` holding ``:`` still owns exactly one room name and no other
        user can own it); a room without a ``:`` has no owner.
        """
        rule = self.policy_for(room).join
        if rule == "token":
            return grants.can_join(room)
        if rule == "anyone":
            return True
        if rule == "owner":
            _, colon, owner = room.partition(":")
            return bool(colon) and bool(owner) and owner == user
        # "proxy": only the backend decides (wsserver.access); "none": the server API only.
        return False

    def can_publish(self, user: str, grants: Grants, room: str, is_member: bool) -> bool:
        """True when ``user`` may publish to ``room``; joining first is always required."""
        if not is_member:
            return False
        rule = self.policy_for(room).publish
        if rule == "members":
            return True
        if rule == "token":
            return grants.can_publish(room)
        # "proxy": only the backend decides (wsserver.access); "none": the server API only.
        return False

    def describe(self) -> str:
        """One line for ``check-config`` and the start-up log."""
        text = f"default namespace {self.default.describe()}"
        if self._namespaces:
            text += "; " + "; ".join(
                f"{name}: {policy.describe()}" for name, policy in self._namespaces.items()
            )
        return text

    @classmethod
    def from_table(cls, table: object, key: str = "rooms") -> RoomPolicy:
        """The policy in a config file's ``[rooms]`` table (as ``tomllib`` reads it).

        A declared namespace starts from the contract's defaults, not from the
        ``[rooms]`` values: what is not written stays closed. Keys may be
        written with ``-`` or ``_``.

        Raises:
            ConfigError: every problem at once, each naming its full key
                (``rooms.namespaces.chat.join: unknown value ...``).
        """
        problems: list[str] = []
        if not isinstance(table, Mapping):
            raise ConfigError([f"{key}: expected a table"])
        default = _policy_from(table, key, problems, allow={"namespaces"})
        namespaces: dict[str, NamespacePolicy] = {}
        raw_namespaces = table.get("namespaces")
        if raw_namespaces is not None and not isinstance(raw_namespaces, Mapping):
            problems.append(f"{key}.namespaces: expected a table of [{key}.namespaces.NAME] tables")
        elif raw_namespaces is not None:
            for name, sub in raw_namespaces.items():
                sub_key = f"{key}.namespaces.{name}"
                if not is_namespace_name(name):
                    problems.append(f"{sub_key}: namespace names are [a-z0-9_-]{{1,32}}")
                    continue
                if not isinstance(sub, Mapping):
                    problems.append(f"{sub_key}: expected a table")
                    continue
                policy = _policy_from(sub, sub_key, problems, allow=set())
                if policy is not None:
                    namespaces[name] = policy
        if problems or default is None:
            raise ConfigError(problems)
        return cls(default, namespaces)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RoomPolicy):
            return NotImplemented
        return self.default == other.default and dict(self._namespaces) == dict(other._namespaces)

    def __hash__(self) -> int:
        return hash((self.default, tuple(self._namespaces.items())))

    def __repr__(self) -> str:
        return f"RoomPolicy({self.default!r}, {dict(self._namespaces)!r})"


def _policy_from(
    table: Mapping[str, Any], key: str, problems: list[str], *, allow: Iterable[str]
) -> NamespacePolicy | None:
    """One namespace's policy from its table, or None after adding problems."""
    values: dict[str, Any] = {}
    before = len(problems)
    allowed = set(allow)
    for spelled, value in table.items():
        name = spelled.replace("-", "_")
        full = f"{key}.{spelled}"
        if name in allowed:
            continue
        if name not in _POLICY_KEYS:
            problems.append(f"{full}: unknown setting (use {', '.join(_POLICY_KEYS)})")
            continue
        if name in values:
            problems.append(f"{full}: given twice (as {name!r} with '-' and '_')")
            continue
        problem = _value_problem(name, value)
        if problem:
            problems.append(f"{full}: {problem}")
            continue
        values[name] = value
    if len(problems) > before:
        return None
    return NamespacePolicy(**values)
