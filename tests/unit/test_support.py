"""The test support package's own pure parts: the minter and the metrics reader.

A reader that answered 0 for everything would make every ``== 0`` assertion
in the suite pass: these pin it to what the registry holds.
"""

from __future__ import annotations

import jwt
from prometheus_client import generate_latest

from tests.support.metrics import labelled, sample, value
from tests.support.tokens import SECRET, mint
from wsserver.metrics import Metrics


def test_the_reader_answers_the_same_from_text_and_from_the_registry() -> None:
    metrics = Metrics()
    metrics.closes.labels(code="4001").inc(3)
    metrics.closes.labels(code="1000").inc()
    metrics.connections.set(2)
    metrics.tasks.labels(name="primes", outcome="ok").inc()
    metrics.task_duration.labels(name="primes").observe(0.5)
    text = generate_latest(metrics.registry).decode()
    for source in (text, metrics.registry):
        assert value(source, "wsserver_closes_total", code="4001") == 3
        assert value(source, "wsserver_closes_total", code="1000") == 1
        assert value(source, "wsserver_connections") == 2
        assert value(source, "wsserver_tasks_total", name="primes", outcome="ok") == 1
        assert value(source, "wsserver_task_duration_seconds_count", name="primes") == 1
        # Labels match exactly: a subset names no sample.
        assert sample(source, "wsserver_tasks_total", name="primes") is None
        assert sample(source, "wsserver_closes_total", code="4321") is None
        assert value(source, "wsserver_closes_total", code="4321") == 0
        assert labelled(source, "wsserver_closes_total") == {"4001": 3.0, "1000": 1.0}
    # One family: its own sample, without naming it.
    assert value(metrics.closes, code="4001") == 3
    assert value(metrics.connections) == 2
    assert labelled(metrics.tasks) == {("primes", "ok"): 1.0}


def test_mint_writes_what_it_is_asked_and_nothing_else() -> None:
    claims = jwt.decode(mint("bob", ttl=60, now=1_000_000_000, rooms=["a"]), SECRET,
                        algorithms=["HS256"], options={"verify_exp": False})
    assert claims == {"sub": "bob", "exp": 1_000_000_060, "rooms": ["a"]}
    bare = jwt.decode(mint(None, ttl=None, iat=5), SECRET, algorithms=["HS256"],
                      options={"verify_exp": False, "verify_iat": False})
    assert bare == {"iat": 5}
    other = mint(key="another-key-0123456789-0123456789-abcd")
    assert jwt.decode(other, options={"verify_signature": False})["sub"] == "alice"
