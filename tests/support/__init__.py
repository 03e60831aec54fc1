"""The test support package: the one place every test's helpers live.

* :mod:`~tests.support.tokens`: the one test secret and the one token minter;
* :mod:`~tests.support.clients`: the one client helper (tornado and
  ``websockets`` clients behind one interface, async and sync);
* :mod:`~tests.support.raw`: a raw RFC 6455 client, for what libraries refuse to do;
* :mod:`~tests.support.metrics`: the one metrics reader;
* :mod:`~tests.support.http`: one HTTP request, errors as answers;
* :mod:`~tests.support.servers`: ``python -m wsserver`` processes, its CLI, free ports;
* :mod:`~tests.support.redis_server`: a real ``redis-server`` per test;
* :mod:`~tests.support.cluster`: several nodes on one Redis (files, flags, API);
* :mod:`~tests.support.deploy`: the shipped deploy files, a real nginx, certificates;
* :mod:`~tests.support.notify`: a stand-in for systemd's notify socket;
* :mod:`~tests.support.browser`: Chromium pages (Playwright);
* :mod:`~tests.support.brokers`: both brokers behind one harness;
* :mod:`~tests.support.sessions`: a Session over a recording transport (unit tests);
* :mod:`~tests.support.tasks` and :mod:`~tests.support.broker_node`: code run in
  other processes (task workers, a node to SIGKILL);
* :mod:`~tests.support.aio` and :mod:`~tests.support.waiting`: bounded scenarios and polls;
* :mod:`~tests.support.ledger`, :mod:`~tests.support.careful`,
  :mod:`~tests.support.publisher` and :mod:`~tests.support.chaos`: the chaos
  suite (what a client saw and its judgement, the careful client, the API
  publisher and readiness watch, the nodes and the scenario).

Fixtures stay in the ``conftest.py`` files (pytest looks for them there) as
thin wrappers over these modules. Imported as ``tests.support.*``: the
repository root is on ``sys.path`` (``pythonpath = .`` in setup.cfg), and
this package imports nothing itself, so a task worker importing
``tests.support.tasks`` loads neither Tornado nor websockets.
"""
