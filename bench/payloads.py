"""The messages the compression rows send: realistic JSON, not repeated bytes.

A compressor's gain depends on what it compresses. ``"x" * 1500`` deflates
to a few bytes and would flatter it; these are the two shapes issue 21
names. A **dashboard update** is a list of metric samples (host, metric
name, value, unit, time), 1-2 kB; a **chat line** is one sentence from a
user, about 150 bytes. Values come from a seeded generator, so every run
sends the same bytes and no two samples repeat. ``seq`` is carried in every
payload so a receiver can check order.
"""

from __future__ import annotations

import json
import random
from typing import Any

HOSTS = ("web-01", "web-02", "web-03", "api-01", "api-02", "db-primary", "db-replica", "cache-1")
METRICS = (
    ("cpu.user", "%"), ("cpu.system", "%"), ("mem.used", "MiB"), ("net.rx", "KiB/s"),
    ("net.tx", "KiB/s"), ("disk.read", "IOPS"), ("disk.write", "IOPS"), ("http.p99", "ms"),
    ("http.rps", "req/s"), ("queue.depth", "jobs"),
)  # fmt: skip
WORDS = (
    "the", "deploy", "looks", "fine", "on", "staging", "can", "you", "check", "latency",
    "graph", "again", "after", "lunch", "I", "think", "cache", "warmed", "up", "now", "and",
    "errors", "dropped", "to", "zero", "thanks", "for", "quick", "fix", "yesterday",
)  # fmt: skip


def _size(data: Any) -> int:
    return len(json.dumps(data, separators=(",", ":")))


def dashboard_update(seq: int, size: int = 1500) -> dict[str, Any]:
    """A dashboard update whose JSON (compact) is about ``size`` bytes (at least 40)."""
    rng = random.Random(seq)
    samples: list[dict[str, Any]] = []
    data: dict[str, Any] = {"seq": seq, "kind": "dashboard", "ts": 1767225600 + seq,
                            "samples": samples}  # fmt: skip
    while True:
        name, unit = METRICS[rng.randrange(len(METRICS))]
        sample = {"host": HOSTS[rng.randrange(len(HOSTS))], "metric": name,
                  "value": round(rng.uniform(0, 1000), 2), "unit": unit}  # fmt: skip
        if samples and _size(data) + _size(sample) + 1 > size:
            break
        samples.append(sample)
    return data


def chat_line(seq: int, size: int = 150) -> dict[str, Any]:
    """A chat message whose JSON (compact) is about ``size`` bytes."""
    rng = random.Random(seq)
    data: dict[str, Any] = {"seq": seq, "user": "alice", "text": ""}
    words: list[str] = []
    while _size(data) < size:
        words.append(WORDS[rng.randrange(len(WORDS))])
        data["text"] = " ".join(words)
    return data


def sized(seq: int, size: int) -> dict[str, Any]:
    """Chat lines below 300 bytes, dashboard updates from there: JSON of about ``size`` bytes."""
    return chat_line(seq, size) if size < 300 else dashboard_update(seq, size)
