"""Every reach into a private attribute of a library other than Tornado, in one place.

Each has no public equivalent; ``tests/unit/test_internals.py`` checks every
one against the installed versions and fails, naming the attribute, when an
upgrade moves it. Tornado's own are in ``wsserver.edge.tornado_internals``.
"""

from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.process import BaseProcess

import jwt

#: The private attributes used below, by owner: what the test checks.
USED: dict[str, tuple[str, ...]] = {
    "jwt.PyJWT": ("_jws",),
    "concurrent.futures.ProcessPoolExecutor": ("_processes",),
    "logging": ("_srcfile",),
}


def pyjwt_jws(decoder: jwt.PyJWT) -> jwt.PyJWS | None:
    """The ``PyJWS`` a ``PyJWT`` instance verifies signatures with (pyjwt 2.x),
    or None: it has no public accessor, and its algorithms are registered
    through PyJWS's public ``register_algorithm``."""
    jws = getattr(decoder, "_jws", None)
    return jws if isinstance(jws, jwt.PyJWS) else None


def executor_processes(executor: ProcessPoolExecutor) -> dict[int, BaseProcess]:
    """The worker processes of ``executor`` by pid (it keeps no public list)."""
    processes: dict[int, BaseProcess] | None = executor._processes  # type: ignore[assignment]
    return dict(processes) if processes else {}


def skip_source_lookup() -> None:
    """Do not work out the source file and line of every log record.

    The logging HOWTO's "Optimization" section documents this switch; it is
    still an underscore name.
    """
    logging._srcfile = None
