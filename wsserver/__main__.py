"""Entry point for ``python -m wsserver``."""

from wsserver.cli import main

raise SystemExit(main())
