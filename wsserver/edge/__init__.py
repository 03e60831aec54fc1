"""The edge: everything that imports Tornado (handlers, the frame layer, wiring).

The pure core (``wsserver/*.py`` outside this package) never imports Tornado;
``tests/unit/test_core_imports.py`` checks it.
"""
