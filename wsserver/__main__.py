"""Entry point for ``python -m wsserver``."""

from wsserver.cli import main

raise SystemExit(main(prog="python -m wsserver"))
