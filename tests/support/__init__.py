"""The test support package: the one place every test's helpers live.

* :mod:`~tests.support.tokens`: the one test secret and the one token minter;
* :mod:`~tests.support.clients`: the one client helper (tornado and
  ``websockets`` clients behind one interface);
* :mod:`~tests.support.raw`: a raw RFC 6455 client, for what libraries refuse to do;
* :mod:`~tests.support.metrics`: the one metrics reader;
* :mod:`~tests.support.servers`: ``python -m wsserver`` processes, its CLI, free ports;
* :mod:`~tests.support.redis_server`: a real ``redis-server`` per test;
* :mod:`~tests.support.aio` and :mod:`~tests.support.waiting`: bounded scenarios and polls.

Fixtures stay in the ``conftest.py`` files (pytest looks for them there) as
thin wrappers over these modules. Imported as ``tests.support.*``: the
repository root is on ``sys.path`` (``pythonpath = .`` in setup.cfg).
"""
