"""The private attributes wsserver reaches into still exist in the installed libraries.

One test per attribute, each failing with the attribute's name when an
upgrade moves it, before anything subtler breaks. The list is the modules'
own ``USED`` tables, and a grep of the package checks that nothing reaches
past them.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import jwt
import pytest
from tornado.http1connection import HTTP1Connection
from tornado.iostream import IOStream

from wsserver import internals
from wsserver.edge import tornado_internals

PACKAGE = Path(__file__).resolve().parents[2] / "wsserver"


def http1_connection() -> Any:
    async def make() -> Any:
        left, right = socket.socketpair()
        stream = IOStream(left)
        try:
            return HTTP1Connection(stream, False)
        finally:
            stream.close()
            right.close()

    return asyncio.run(make())


def io_stream() -> Any:
    async def make() -> Any:
        left, right = socket.socketpair()
        stream = IOStream(left)
        stream.close()
        right.close()
        return stream

    return asyncio.run(make())


def process_pool() -> Any:
    executor = ProcessPoolExecutor(max_workers=1)
    executor.shutdown()
    return executor


#: How to get a real instance of each owner named in the USED tables.
OWNERS: dict[str, Callable[[], Any]] = {
    "tornado.http1connection.HTTP1Connection": http1_connection,
    "tornado.iostream.IOStream": io_stream,
    "jwt.PyJWT": jwt.PyJWT,
    "concurrent.futures.ProcessPoolExecutor": process_pool,
    "logging": lambda: logging,
}

USED = [
    (owner, attribute)
    for table in (tornado_internals.USED, internals.USED)
    for owner, attributes in table.items()
    for attribute in attributes
]


@pytest.mark.parametrize("owner, attribute", USED, ids=[f"{o}.{a}" for o, a in USED])
def test_the_private_attribute_is_still_there(owner: str, attribute: str) -> None:
    instance = OWNERS[owner]()
    assert hasattr(instance, attribute), (
        f"{owner}.{attribute} is gone from the installed version: wsserver reaches into it "
        f"(see wsserver/internals.py or wsserver/edge/tornado_internals.py); find its "
        f"replacement before upgrading"
    )


def test_the_pyjwt_decoder_really_has_a_pyjws() -> None:
    assert internals.pyjwt_jws(jwt.PyJWT()) is not None, "PyJWT()._jws is no PyJWS any more"


def test_no_other_module_reaches_into_a_private_attribute() -> None:
    """Every ``x._name`` outside the two modules is the code's own (``self._``,
    ``cls._``) or public despite its underscore (``os._exit``, Enum's ``_value_``)."""
    # The package's own objects by the names it gives them (the client's Room
    # and Client are friends within one module), and os._exit (public).
    own = "self|cls|other|super\\(\\)|Session|bucket|connection|member|room|handle|client"
    allowed = re.compile(rf"({own})\._|os\._exit")
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.name in {"internals.py", "tornado_internals.py"}:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = re.sub(r"`[^`]*`", "", line.split("#", 1)[0])  # names in docs
            for match in re.finditer(r"[\w\)\]]+\._[a-z]\w*", code):
                if not allowed.match(match.group(0)):
                    found.append(f"{path.relative_to(PACKAGE)}:{number}: {match.group(0)}")
    assert found == [], "move these into wsserver/internals.py or tornado_internals.py"
