"""The task table: built-in results, argument validation, user task modules."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path
from typing import Any

import pytest

from wsserver.errors import BadRequest, ConfigError, UnknownTask
from wsserver.tasks import (
    BUILTINS,
    Int,
    Str,
    TaskTable,
    count_primes,
    iterated_sha256,
    load_task_table,
)


def is_prime_by_trial_division(n: int) -> bool:
    """An independent, obviously correct (and slow) test."""
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


# --- results -------------------------------------------------------------------


def test_primes_matches_trial_division_for_every_limit_up_to_3000() -> None:
    below = 0  # primes below `limit`, counted one number at a time
    for limit in range(3000):
        assert count_primes(limit) == below, limit
        below += is_prime_by_trial_division(limit)


@pytest.mark.parametrize(
    ("limit", "published"),
    [(10**6, 78_498), (10**7, 664_579), (50_000_000, 3_001_134)],
)
def test_primes_matches_published_prime_counts(limit: int, published: int) -> None:
    assert count_primes(limit) == published


def test_sha256_one_round_is_the_fips_180_test_vector() -> None:
    assert iterated_sha256("abc", 1) == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


@pytest.mark.parametrize(("data", "rounds"), [("abc", 2), ("", 7), ("héllo ✓", 1000)])
def test_sha256_hashes_raw_digests_from_the_utf8_bytes(data: str, rounds: int) -> None:
    digest = data.encode("utf-8")
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    assert iterated_sha256(data, rounds) == digest.hex()


# --- validation ------------------------------------------------------------------

VALID: list[tuple[str, dict[str, Any]]] = [
    ("primes", {"limit": 0}),
    ("primes", {"limit": 50_000_000}),
    ("sha256", {"data": "", "rounds": 1}),
    ("sha256", {"data": "x" * 60_000, "rounds": 10_000_000}),
]


@pytest.mark.parametrize(("name", "args"), VALID)
def test_arguments_at_the_bounds_are_accepted(name: str, args: dict[str, Any]) -> None:
    task, kwargs = BUILTINS.prepare(name, args)
    assert task.name == name
    assert kwargs == args


INVALID: list[tuple[str, Any, str]] = [
    # (name, args, words the message must contain)
    ("primes", {}, "args.limit is missing"),
    ("primes", {"limit": True}, "args.limit must be an integer, not a boolean"),
    ("primes", {"limit": False}, "args.limit must be an integer, not a boolean"),
    ("primes", {"limit": 10.0}, "args.limit must be an integer, not a number"),
    ("primes", {"limit": "10"}, "args.limit must be an integer, not a string"),
    ("primes", {"limit": None}, "args.limit must be an integer, not null"),
    ("primes", {"limit": [10]}, "args.limit must be an integer, not an array"),
    ("primes", {"limit": -1}, "args.limit must be between 0 and 50000000"),
    ("primes", {"limit": 50_000_001}, "args.limit must be between 0 and 50000000"),
    ("primes", {"limit": 10**100}, "args.limit must be between 0 and 50000000"),
    ("primes", {"limit": 10, "extra": 1}, "unexpected argument(s) extra; it takes limit"),
    ("primes", [10], "args must be an object, not an array"),
    ("primes", None, "args must be an object, not null"),
    ("sha256", {"data": "x"}, "args.rounds is missing"),
    ("sha256", {"rounds": 1}, "args.data is missing"),
    ("sha256", {"data": "x", "rounds": 0}, "args.rounds must be between 1 and 10000000"),
    ("sha256", {"data": "x", "rounds": 10_000_001}, "args.rounds must be between 1 and 10000000"),
    ("sha256", {"data": "x", "rounds": True}, "args.rounds must be an integer, not a boolean"),
    ("sha256", {"data": "x", "rounds": 1.5}, "args.rounds must be an integer, not a number"),
    ("sha256", {"data": 5, "rounds": 1}, "args.data must be a string, not a number"),
    ("sha256", {"data": None, "rounds": 1}, "args.data must be a string, not null"),
    ("sha256", {"data": True, "rounds": 1}, "args.data must be a string, not a boolean"),
    ("sha256", {"data": {"a": 1}, "rounds": 1}, "args.data must be a string, not an object"),
    ("sha256", {"data": "\ud800", "rounds": 1}, "args.data must be valid Unicode"),
    ("sha256", {"data": "x", "rounds": 1, "salt": "y"}, "unexpected argument(s) salt"),
]


@pytest.mark.parametrize(("name", "args", "message"), INVALID)
def test_bad_arguments_are_a_bad_request_saying_which(name: str, args: Any, message: str) -> None:
    with pytest.raises(BadRequest) as caught:
        BUILTINS.prepare(name, args)
    assert caught.value.code == "bad_request"
    assert message in caught.value.message
    assert caught.value.message.startswith(f"task {name!r}: ")


@pytest.mark.parametrize("name", ["nope", "", "PRIMES", None, 7, ["primes"]])
def test_unknown_names_are_unknown_task(name: Any) -> None:
    with pytest.raises(UnknownTask) as caught:
        BUILTINS.prepare(name, {"limit": 1})
    assert caught.value.code == "unknown_task"
    assert "known: primes, sha256" in caught.value.message


def test_error_messages_do_not_echo_huge_client_input() -> None:
    with pytest.raises(UnknownTask) as caught:
        BUILTINS.get("x" * 10_000)
    assert len(caught.value.message) < 200
    many_long_names = {str(i) * 5_000: 1 for i in range(100)}
    with pytest.raises(BadRequest) as bad:
        BUILTINS.prepare("primes", {"limit": 1, **many_long_names})
    assert len(bad.value.message) < 500


# --- registration ---------------------------------------------------------------


def module_level(n: int) -> int:
    return n


def test_registration_refuses_functions_a_worker_cannot_import() -> None:
    table = TaskTable()

    def nested(n: int) -> int:
        return n

    with pytest.raises(ValueError, match="not a module-level function"):
        table.task("nested", n=Int(0, 1))(nested)
    with pytest.raises(ValueError, match="not a module-level function"):
        table.task("lambda")(lambda: None)
    assert len(table) == 0


def test_registration_refuses_a_name_twice_and_params_that_are_not_params() -> None:
    table = TaskTable()
    table.task("same", n=Int(0, 1))(module_level)
    with pytest.raises(ValueError, match="registered twice"):
        table.task("same", n=Int(0, 1))(module_level)
    with pytest.raises(ValueError, match="not a Param"):
        table.task("other", n=int)(module_level)  # type: ignore[arg-type]
    assert table.names == ["same"]


def test_str_param_bounds_length() -> None:
    assert Str(max_length=3).check("abc") == "abc"
    with pytest.raises(ValueError, match="at most 3 characters"):
        Str(max_length=3).check("abcd")


# --- user task modules ---------------------------------------------------------------


def test_no_module_gives_exactly_the_builtins() -> None:
    assert load_task_table(None).names == ["primes", "sha256"]


def test_the_documented_example_module_adds_its_tasks() -> None:
    table = load_task_table("tests.example_tasks")
    assert table.names == ["fibonacci", "primes", "sha256", "word_count"]

    task, kwargs = table.prepare("fibonacci", {"n": 78})
    assert task.func(**kwargs) == 8_944_394_323_791_464  # exact below 2**53
    with pytest.raises(BadRequest, match=r"args\.n must be between 0 and 78"):
        table.prepare("fibonacci", {"n": 79})

    task, kwargs = table.prepare("word_count", {"text": "The cat saw the dog."})
    assert task.func(**kwargs) == {"the": 2, "cat": 1, "dog": 1, "saw": 1}


def write_module(directory: Path, name: str, body: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(body))


@pytest.mark.parametrize(
    ("module", "body", "problem"),
    [
        ("wsserver_no_such_module", None, "cannot import it: ModuleNotFoundError"),
        # Not on the path: where to put it (an installed command does not look in ".").
        ("wsserver_pkg_absent.tasks", None,
         "put the folder holding wsserver_pkg_absent on PYTHONPATH"),
        ("wsserver_tasks_broken", "import no_such_dependency\n", "cannot import it"),
        ("wsserver_tasks_missing", "x = 1\n", "defines no 'tasks = TaskTable()'"),
        (
            "wsserver_tasks_clash",
            """
            from wsserver.tasks import Int, TaskTable
            tasks = TaskTable()

            @tasks.task("primes", limit=Int(0, 10))
            def mine(limit: int) -> int:
                return limit
            """,
            "task 'primes' is registered twice",
        ),
    ],
)
def test_a_bad_tasks_module_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, body: str | None, problem: str
) -> None:
    if body is not None:
        write_module(tmp_path, module, body)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as caught:
        load_task_table(module)
    [line] = caught.value.problems
    assert line.startswith(f"--tasks-module {module}: ")
    assert problem in line
    # A module that imports but lacks a dependency is not a PYTHONPATH matter.
    assert ("PYTHONPATH" in line) == (body is None)


def test_docs_show_the_example_module_that_the_tests_run() -> None:
    root = Path(__file__).resolve().parents[2]
    example = (root / "tests" / "example_tasks.py").read_text()
    assert f"```python\n{example}```" in (root / "docs" / "tasks.md").read_text()
