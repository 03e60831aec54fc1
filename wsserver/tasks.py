"""The task table: tasks by name, each with the validation of its arguments.

A task is a plain top-level function (it runs in a worker process, which
imports it by module and name) registered with the parameters it accepts::

    tasks = TaskTable()

    @tasks.task("primes", limit=Int(0, 50_000_000))
    def count_primes(limit: int) -> int: ...

:meth:`TaskTable.prepare` checks a client's ``args`` against those parameters
before anything reaches the pool, so a bad request costs no worker time. User
modules named by ``--tasks-module`` define their own ``tasks = TaskTable()``
the same way; :func:`load_task_table` merges it with the built-ins.

This module knows nothing of Tornado, sockets or processes.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from wsserver.errors import BadRequest, ConfigError, UnknownTask

__all__ = [
    "BUILTINS",
    "Int",
    "Param",
    "Str",
    "Task",
    "TaskTable",
    "count_primes",
    "iterated_sha256",
    "load_task_table",
]

F = TypeVar("F", bound=Callable[..., Any])

PRIMES_MAX_LIMIT = 50_000_000
SHA256_MAX_ROUNDS = 10_000_000


def json_type(value: object) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


class Param:
    """One named argument of a task: checks a decoded JSON value.

    Subclass it and override :meth:`check` for argument kinds not covered by
    :class:`Int` and :class:`Str`.
    """

    def check(self, value: Any) -> Any:
        """Return the value to pass to the task, or raise ``ValueError``.

        The message of the ``ValueError`` completes "args.NAME ..." and is
        shown to the client, so it must not echo large values.
        """
        raise NotImplementedError


@dataclass(frozen=True)
class Int(Param):
    """An integer within ``[minimum, maximum]``; booleans and floats are refused."""

    minimum: int
    maximum: int

    def check(self, value: Any) -> int:
        # bool is a subclass of int in Python, but true is not a number in JSON.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, not {json_type(value)}")
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"must be between {self.minimum} and {self.maximum}")
        return value


@dataclass(frozen=True)
class Str(Param):
    """A string that encodes to UTF-8, at most ``max_length`` characters if given."""

    max_length: int | None = None

    def check(self, value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, not {json_type(value)}")
        if self.max_length is not None and len(value) > self.max_length:
            raise ValueError(f"must be at most {self.max_length} characters")
        try:
            # JSON may carry lone surrogates ("\ud800"), which have no UTF-8 form.
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("must be valid Unicode (it holds a lone surrogate)") from None
        return value


@dataclass(frozen=True)
class Task:
    """A registered task: its name, its function and its parameters."""

    name: str
    func: Callable[..., Any]
    params: Mapping[str, Param]

    def validate(self, args: Any) -> dict[str, Any]:
        """Check a client's ``args`` and return the keyword arguments for ``func``.

        Raises:
            BadRequest: ``args`` is not an object, or an argument is missing,
                unexpected, of the wrong type or out of bounds.
        """
        if not isinstance(args, dict):
            raise BadRequest(f"task {self.name!r}: args must be an object, not {json_type(args)}")
        unexpected = sorted(str(key) for key in args if key not in self.params)
        if unexpected:
            # Client-chosen names: show a few, each cut short, never the lot.
            shown = ", ".join(key[:64] for key in unexpected[:5])
            raise BadRequest(
                f"task {self.name!r}: unexpected argument(s) {shown}; "
                f"it takes {self._signature()}"
            )
        kwargs: dict[str, Any] = {}
        for name, param in self.params.items():
            if name not in args:
                raise BadRequest(f"task {self.name!r}: args.{name} is missing")
            try:
                kwargs[name] = param.check(args[name])
            except ValueError as exc:
                raise BadRequest(f"task {self.name!r}: args.{name} {exc}") from None
        return kwargs

    def _signature(self) -> str:
        return ", ".join(self.params) if self.params else "no arguments"


class TaskTable:
    """Tasks by name. Register with :meth:`task`; look up with :meth:`prepare`."""

    def __init__(self) -> None:
        self._tasks: dict[str, Task] = {}

    def task(self, name: str, **params: Param) -> Callable[[F], F]:
        """Decorator: register the function as task ``name`` taking ``params``.

        Raises:
            ValueError: the name is taken, or the function cannot be imported
                by a worker process (a nested function or a lambda).
        """

        def register(func: F) -> F:
            self.add(Task(name, func, dict(params)))
            return func

        return register

    def add(self, task: Task) -> None:
        """Register a :class:`Task` built by hand (see :meth:`task`)."""
        if task.name in self._tasks:
            raise ValueError(f"task {task.name!r} is registered twice")
        qualname = getattr(task.func, "__qualname__", "")
        if "<" in qualname or "." in qualname:
            # Workers receive the function by reference (module and name), so
            # only a module-level function can reach them.
            raise ValueError(f"task {task.name!r}: {qualname} is not a module-level function")
        for param_name, param in task.params.items():
            if not isinstance(param, Param):
                raise ValueError(f"task {task.name!r}: {param_name} is not a Param")
        self._tasks[task.name] = task

    def update(self, other: TaskTable) -> None:
        """Register every task of ``other``; names must not clash."""
        for task in other:
            self.add(task)

    def get(self, name: Any) -> Task:
        """The task called ``name``.

        Raises:
            UnknownTask: no task has that name.
        """
        task = self._tasks.get(name) if isinstance(name, str) else None
        if task is None:
            shown = name if isinstance(name, str) and len(name) <= 64 else json_type(name)
            raise UnknownTask(f"unknown task {shown!r}; known: {', '.join(sorted(self._tasks))}")
        return task

    def prepare(self, name: Any, args: Any) -> tuple[Task, dict[str, Any]]:
        """Look up and validate: the task and its keyword arguments.

        Raises:
            UnknownTask: no task has that name.
            BadRequest: the arguments do not fit the task's parameters.
        """
        task = self.get(name)
        return task, task.validate(args)

    def __iter__(self) -> Iterator[Task]:
        return iter(list(self._tasks.values()))

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    @property
    def names(self) -> list[str]:
        """Registered task names, sorted."""
        return sorted(self._tasks)


# --- built-in tasks ----------------------------------------------------------

BUILTINS = TaskTable()


@BUILTINS.task("primes", limit=Int(0, PRIMES_MAX_LIMIT))
def count_primes(limit: int) -> int:
    """The number of primes below ``limit`` (sieve of Eratosthenes over odd numbers)."""
    if limit < 3:
        return 0
    # sieve[i] stands for the odd number 2*i + 1; every odd number below limit has one.
    size = limit // 2
    sieve = bytearray([1]) * size
    sieve[0] = 0  # 1 is not prime
    i = 1
    while (2 * i + 1) ** 2 < limit:
        if sieve[i]:
            p = 2 * i + 1
            start = p * p // 2
            # Slice assignment crosses out every odd multiple from p*p in C, not Python.
            sieve[start::p] = bytes(len(range(start, size, p)))
        i += 1
    return sieve.count(1) + 1  # the odd primes, and 2


@BUILTINS.task("sha256", data=Str(), rounds=Int(1, SHA256_MAX_ROUNDS))
def iterated_sha256(data: str, rounds: int) -> str:
    """SHA-256 applied ``rounds`` times to the UTF-8 bytes of ``data``; the last digest in hex."""
    digest = data.encode("utf-8")
    sha256 = hashlib.sha256
    for _ in range(rounds):
        digest = sha256(digest).digest()
    return digest.hex()


def load_task_table(tasks_module: str | None) -> TaskTable:
    """The built-in tasks, plus those of ``tasks_module`` when one is named.

    The module is imported by name and must define ``tasks``, a
    :class:`TaskTable`. Worker processes import the same module, so its task
    functions resolve there too.

    Raises:
        ConfigError: the module cannot be imported, defines no ``tasks`` table,
            or reuses a task name.
    """
    table = TaskTable()
    table.update(BUILTINS)
    if not tasks_module:
        return table
    flag = f"--tasks-module {tasks_module}"
    try:
        module = importlib.import_module(tasks_module)
    except ModuleNotFoundError as exc:
        hint = ""
        if exc.name and tasks_module.split(".")[0] == exc.name.split(".")[0]:
            # An installed command, unlike "python -m", does not import from the
            # current folder.
            hint = (f" (it is imported by name: put the folder holding {exc.name.split('.')[0]}"
                    " on PYTHONPATH, e.g. PYTHONPATH=. from that folder)")
        raise ConfigError([f"{flag}: cannot import it: ModuleNotFoundError: {exc}{hint}"]) from exc
    except Exception as exc:
        raise ConfigError([f"{flag}: cannot import it: {type(exc).__name__}: {exc}"]) from exc
    user_tasks = getattr(module, "tasks", None)
    if not isinstance(user_tasks, TaskTable):
        raise ConfigError([f"{flag}: defines no 'tasks = TaskTable()' (see docs/tasks.md)"])
    try:
        table.update(user_tasks)
    except ValueError as exc:
        raise ConfigError([f"{flag}: {exc}"]) from exc
    return table
