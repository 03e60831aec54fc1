"""Plain reference echo servers for ``bench.raw_echo`` (no wsserver code in them)."""
