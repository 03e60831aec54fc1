"""Command line: ``serve`` (the default), ``token`` and ``check-config``.

Exit codes: 0 success; 1 the server failed at run time (for example the port
is taken); 2 the configuration or the command line is wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import Any

from wsserver import __version__
from wsserver.auth import TokenIssuer
from wsserver.config import Settings, add_arguments, load_settings
from wsserver.errors import ConfigError

COMMANDS = ("serve", "token", "check-config")
EXIT_RUNTIME = 1
EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    """The parser for every subcommand; options also come from env and file."""
    parser = argparse.ArgumentParser(
        prog="python -m wsserver",
        description=(
            "A WebSocket server, secure by default. Every option can also be set as "
            "WSSERVER_<OPTION> in the environment or in a TOML file given with --config; "
            "precedence: flag > environment > file > default. Without a JWT key it runs "
            "in demo mode on loopback."
        ),
        epilog="Run 'python -m wsserver serve --help' for every server option.",
    )
    parser.add_argument("--version", action="version", version=f"wsserver {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{serve,token,check-config}")

    serve = sub.add_parser("serve", help="serve WebSocket connections (the default)")
    add_arguments(serve)

    token = sub.add_parser("token", help="print a signed JWT for SUB with the configured key")
    token.add_argument("sub", metavar="SUB", help="the token's subject (user)")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    add_arguments(token)

    check = sub.add_parser("check-config", help="validate the configuration: exit 0 or 2")
    add_arguments(check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0] not in (*COMMANDS, "-h", "--help", "--version"):
        args_list.insert(0, "serve")
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:
        return int(exc.code or 0)
    flags = {
        key: value for key, value in vars(args).items() if key not in ("command", "sub", "ttl")
    }
    try:
        settings = load_settings(flags)
        if args.command == "check-config":
            _check_runtime_parts(settings)
    except ConfigError as error:
        for problem in error.problems:
            print(f"wsserver: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "token":
        return _token(settings, args)
    if args.command == "check-config":
        return _check_config(settings)
    return _serve(settings)


def _check_runtime_parts(settings: Settings) -> None:
    """What only building the parts can tell: the TLS pair, the tasks module."""
    from wsserver.server import make_ssl_context
    from wsserver.tasks import load_task_table

    problems: list[str] = []
    try:
        make_ssl_context(settings)
    except ConfigError as error:
        problems.extend(error.problems)
    try:
        load_task_table(settings.tasks_module)
    except Exception as exc:
        problems.append(f"--tasks-module {settings.tasks_module}: cannot load: {exc}")
    if problems:
        raise ConfigError(problems)


def _check_config(settings: Settings) -> int:
    mode = "demo mode (no JWT key)" if settings.demo_mode else "JWT key configured"
    origins = ",".join(settings.allowed_origins) or (
        "loopback" if settings.default_origins else "none"
    )
    print(
        f"configuration OK: {mode}; {settings.scheme}://{settings.host}:{settings.port}; "
        f"algorithms {','.join(settings.jwt_algorithms)}; "
        f"origins {origins}"
    )
    return 0


def _token(settings: Settings, args: Any) -> int:
    if settings.demo_mode or not settings.can_sign or settings.verify_key is None:
        print(
            "wsserver: the token command signs with the configured HMAC secret: "
            "give --jwt-secret-file (or WSSERVER_JWT_SECRET); with a public key, "
            "tokens come from your identity provider",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    if args.ttl < 1:
        print("wsserver: --ttl must be at least 1 second", file=sys.stderr)
        return EXIT_CONFIG
    issuer = TokenIssuer(
        settings.verify_key.reveal(),
        settings.jwt_algorithms[0],
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
        typ=settings.jwt_typ,
    )
    token, _ = issuer.issue(args.sub, args.ttl)
    print(token)
    return 0


def _serve(settings: Settings) -> int:
    from wsserver.server import Server

    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    log = logging.getLogger("wsserver")
    try:
        server = Server(settings)
        asyncio.run(server.serve())
    except ConfigError as error:
        for problem in error.problems:
            log.error("%s", problem)
        return EXIT_CONFIG
    except OSError as exc:
        log.error("cannot serve on %s:%d: %s", settings.host, settings.port, exc.strerror or exc)
        return EXIT_RUNTIME
    return 0
