"""Command line: ``serve`` (the default), ``token``, ``check-config``, ``publish``
and ``genconfig``.

Exit codes: 0 success; 1 the server failed at run time; 2 the configuration
or the command line is wrong, or the server cannot start (for example the
port is taken).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import math
import sys
from collections.abc import Sequence
from typing import Any

from wsserver import __version__, logconfig, loops
from wsserver.auth import MAX_SUB_LENGTH, TokenIssuer
from wsserver.config import (
    OPTIONS,
    Settings,
    add_arguments,
    api_key_of,
    bool_parser,
    load_options,
    load_settings,
)
from wsserver.errors import ConfigError
from wsserver.internals import skip_source_lookup

COMMANDS = ("serve", "token", "check-config", "publish", "genconfig")
EXIT_RUNTIME = 1
EXIT_CONFIG = 2
#: ``token --ttl`` when not given (capped to ``--max-token-lifetime``).
DEFAULT_TOKEN_TTL = 3600

#: The options ``token`` reads: the key, and the claims it puts in the token.
TOKEN_OPTIONS = (
    "jwt_secret", "jwt_secret_file", "jwt_algorithms",
    "jwt_audience", "jwt_issuer", "jwt_typ", "max_token_lifetime",
)

#: The options ``publish`` reads: where the server's API is, and its key.
PUBLISH_OPTIONS = (
    "host", "port", "internal_host", "internal_port", "certfile", "api_key", "api_key_file",
)
#: What those flags mean to ``publish``, a client of the server.
PUBLISH_HELPS = {
    "host": "the server's address (its --host; 0.0.0.0 or :: mean this machine)",
    "port": "the server's port (its --port)",
    "internal_host": "the server's --internal-host",
    "internal_port": "the server's --internal-port: the API is there when it is set",
    "certfile": "set when the server serves TLS on --port (https)",
    "api_key": "the server's API key (prefer --api-key-file)",
    "api_key_file": "file holding the server's API key",
}

#: uvicorn flags people try first, and what wsserver has instead (docs/deploy.md,
#: "Mapping the uvicorn recipe's knobs"). Flags wsserver itself defines are never
#: answered from here.
UVICORN_FLAGS = {
    "--workers": "one wsserver process serves many connections; run several behind nginx",
    "--reload": "no reload: restart the process (systemctl restart wsserver)",
    "--forwarded-allow-ips": "use --trusted-proxies ADDRESSES",
    "--ssl-certfile": "use --certfile",
    "--ssl-keyfile": "use --keyfile",
    "--ws-max-size": "use --max-message-size",
    "--ws-ping-interval": "use --ping-interval",
    "--ws-ping-timeout": "use --ping-interval: a peer that has not answered a ping by the "
                         "next one is closed",
    "--timeout-keep-alive": "use --header-timeout (seconds an idle HTTP connection may wait "
                            "for its next request)",
    "--timeout-graceful-shutdown": "use --drain-timeout (seconds connections get to close "
                                   "on SIGTERM)",
    "--backlog": "none: the listen backlog is fixed at 1024 (the kernel caps it at "
                 "net.core.somaxconn)",
    "--limit-max-requests": "none: nothing grows per request, and a restart drops every "
                            "connection",
    "--limit-concurrency": "use --max-connections",
}


def build_parser(prog: str = "wsserver") -> argparse.ArgumentParser:
    """The parser for every subcommand; options also come from env and file.

    ``prog`` is how the user ran it, for usage lines and hints.
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "A WebSocket server, secure by default. Every option can also be set as "
            "WSSERVER_<OPTION> in the environment or in a TOML file given with --config; "
            "precedence: flag > environment > file > default. Without a JWT key it runs "
            "in demo mode on loopback."
        ),
        epilog=f"Run '{prog} serve --help' for every server option.",
    )
    parser.add_argument("--version", action="version", version=f"wsserver {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")

    serve = sub.add_parser("serve", help="serve WebSocket connections (the default)")
    add_arguments(serve)

    token = sub.add_parser(
        "token",
        help="print a signed JWT for SUB with the configured key",
        description="Print a JWT for SUB signed with the configured HMAC secret.",
    )
    token.add_argument("sub", metavar="SUB", help="the token's subject (user)")
    token.add_argument(
        "--ttl", type=int, default=None,
        help=f"lifetime in seconds (default {DEFAULT_TOKEN_TTL}, or --max-token-lifetime "
             "when that is lower; above it the server would refuse the token)",
    )
    token.add_argument("--rooms", metavar="LIST", default=None,
                       help="comma list for the 'rooms' claim (join): room names or prefix*")
    token.add_argument("--publish", metavar="LIST", default=None,
                       help="comma list for the 'publish' claim: room names or prefix*")
    add_arguments(token, only=TOKEN_OPTIONS)

    check = sub.add_parser("check-config", help="validate the configuration: exit 0 or 2")
    add_arguments(check)

    publish = sub.add_parser(
        "publish",
        help="publish JSON to a room through the server API (exit 0 on 200, else 1)",
        description="POST /api/publish to a running server with its API key. The server "
                    "is found from the same configuration it runs with (--config, "
                    "WSSERVER_* or these flags), or at --url.",
    )
    publish.add_argument("room", metavar="ROOM", help="the room")
    publish.add_argument("data", metavar="JSON", help="the message's data, as JSON")
    publish.add_argument(
        "--url", default=None,
        help="the server's API base URL (default: http://HOST:PORT, or the internal "
             "listener when --internal-port is set)",
    )
    publish.add_argument("--idempotency-key", default=None, dest="idempotency_key",
                         help="publish once per key within 5 minutes")
    add_arguments(publish, only=PUBLISH_OPTIONS, helps=PUBLISH_HELPS)

    sub.add_parser(
        "genconfig",
        help="print a commented TOML configuration with every option and its default",
        description="Print a TOML configuration file with every option, its help and its "
                    "default (commented out), and the [rooms] table; "
                    "check-config --config accepts it as printed.",
    )
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "wsserver") -> int:
    """Run the command line; returns the process exit code.

    ``prog``: how the user ran it (``python -m wsserver`` from ``__main__``).
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and not args_list[0].startswith("-") and args_list[0] not in COMMANDS:
        # The server takes no positional argument: this was meant as a command.
        print(_unknown_command(args_list[0], prog), file=sys.stderr)
        return EXIT_CONFIG
    if not args_list or args_list[0] not in (*COMMANDS, "-h", "--help", "--version"):
        args_list.insert(0, "serve")
    parser = build_parser(prog)
    hint = _uvicorn_hint(args_list)
    if hint:
        print(hint, file=sys.stderr)
        return EXIT_CONFIG
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.command == "genconfig":
        from wsserver.genconfig import render

        print(render(), end="")
        return 0
    own = ("command", "sub", "ttl", "rooms", "publish", "room", "data", "url", "idempotency_key")
    flags = {key: value for key, value in vars(args).items() if key not in own}
    try:
        if args.command == "publish":
            return _publish(load_options(PUBLISH_OPTIONS, flags), args)
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


def _unknown_command(word: str, prog: str) -> str:
    """"unknown command 'tokne'; did you mean 'token'?" and where the commands are listed."""
    close = difflib.get_close_matches(word, COMMANDS, n=1, cutoff=0.6)
    guess = f"; did you mean '{close[0]}'?" if close else ""
    if not close and ":" in word:
        # uvicorn's "main:app": wsserver is the application, there is none to name.
        guess = " (wsserver is the server and the application: it takes no APP argument)"
    return (f"{prog}: unknown command '{word}'{guess} (commands: {', '.join(COMMANDS)}; "
            f"serve is the default; see '{prog} --help')")


def _uvicorn_hint(args: Sequence[str]) -> str | None:
    """A pointer to wsserver's equivalent when ``args`` holds a uvicorn-only flag."""
    own = {option.flag for option in OPTIONS} | {
        "--no-" + option.flag[2:] for option in OPTIONS if option.parse is bool_parser
    }
    for arg in args:
        if arg == "--":
            break
        flag = arg.split("=", 1)[0]
        if flag in UVICORN_FLAGS and flag not in own:
            return (
                f"wsserver: {flag} is a uvicorn flag, not a wsserver one: "
                f"{UVICORN_FLAGS[flag]}. See docs/deploy.md, \"Mapping the uvicorn recipe's knobs\""
            )
    return None


def _check_runtime_parts(settings: Settings) -> None:
    """What only building the parts can tell: the TLS pair, the tasks module, the
    logging configuration."""
    from wsserver.edge.server import make_ssl_context
    from wsserver.tasks import load_task_table

    problems: list[str] = []
    try:
        make_ssl_context(settings)
    except ConfigError as error:
        problems.extend(error.problems)
    if settings.log_config:
        try:
            logconfig.apply_config_file(settings.log_config)
        except ConfigError as error:
            problems.extend(error.problems)
    try:
        load_task_table(settings.tasks_module)
    except ConfigError as error:
        problems.extend(error.problems)
    except Exception as exc:
        problems.append(f"--tasks-module {settings.tasks_module}: cannot load: {exc}")
    if problems:
        raise ConfigError(problems)


def _check_config(settings: Settings) -> int:
    if settings.demo_mode:
        mode = "demo mode (no JWT key)"
    elif settings.jwt_jwks_url:
        mode = "tokens verified against a JWKS"
    elif settings.verify_key is None:
        mode = "no JWT key: connections through the connect proxy only"
    else:
        mode = "JWT key configured"
    if settings.proxy_urls:
        mode += "; proxies: " + ", ".join(settings.proxy_urls)
    origins = ",".join(settings.allowed_origins) or (
        "loopback" if settings.default_origins else "none"
    )
    print(
        f"configuration OK: {mode}; {settings.scheme}://{settings.host}:{settings.port}; "
        f"algorithms {','.join(settings.jwt_algorithms)}; "
        f"origins {origins}"
    )
    source = "from the config file" if settings.rooms_from_file else (
        "demo mode" if settings.demo_mode else "defaults"
    )
    print(f"rooms ({source}): {settings.rooms.describe()}")
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
    if not args.sub.strip():
        print("wsserver: SUB must not be empty (the server refuses tokens without a sub)",
              file=sys.stderr)
        return EXIT_CONFIG
    if len(args.sub) > MAX_SUB_LENGTH:
        print(f"wsserver: SUB is longer than {MAX_SUB_LENGTH} characters; the server "
              "would refuse the token", file=sys.stderr)
        return EXIT_CONFIG
    ttl = _token_ttl(args.ttl, settings.max_token_lifetime)
    if ttl is None:
        return EXIT_CONFIG
    issuer = TokenIssuer(
        settings.verify_key.reveal(),
        settings.jwt_algorithms[0],
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
        typ=settings.jwt_typ,
    )
    try:
        token, _ = issuer.issue(
            args.sub, ttl, rooms=_room_list(args.rooms), publish=_room_list(args.publish)
        )
    except ValueError as exc:
        print(f"wsserver: --rooms/--publish: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(token)
    return 0


def _token_ttl(asked: int | None, max_lifetime: float | None) -> int | None:
    """The token's lifetime: ``--ttl``, or the default capped to ``--max-token-lifetime``.

    None (after saying why) for a ``--ttl`` the server would refuse: a token
    living longer than ``--max-token-lifetime`` is refused at connect (4001).
    """
    if asked is not None and asked < 1:
        print("wsserver: --ttl must be at least 1 second", file=sys.stderr)
        return None
    longest = None if max_lifetime is None else math.floor(max_lifetime)
    if longest is not None and longest < 1:
        print(f"wsserver: --max-token-lifetime {max_lifetime:g} is under a second: "
              "no token can satisfy it", file=sys.stderr)
        return None
    if asked is None:
        return DEFAULT_TOKEN_TTL if longest is None else min(DEFAULT_TOKEN_TTL, longest)
    if longest is not None and asked > longest:
        print(f"wsserver: --ttl {asked} is above --max-token-lifetime {max_lifetime:g}: the "
              f"server would refuse the token; give --ttl {longest} or less", file=sys.stderr)
        return None
    return asked


def _publish(options: dict[str, Any], args: Any) -> int:
    """``publish ROOM JSON``: one ``POST /api/publish`` with the configured key.

    ``options``: :data:`PUBLISH_OPTIONS`, resolved as the server resolves them.
    """
    import json
    import urllib.error
    import urllib.request

    api_key = api_key_of(options)
    if api_key is None:
        print("wsserver: publish needs the server's API key: give --api-key-file "
              "(or WSSERVER_API_KEY)", file=sys.stderr)
        return EXIT_CONFIG
    try:
        data = json.loads(args.data)
    except ValueError as exc:
        print(f"wsserver: JSON is not valid JSON: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    url = args.url or _api_url(options)
    body: dict[str, Any] = {"room": args.room, "data": data}
    if args.idempotency_key:
        body["idempotency_key"] = args.idempotency_key
    request = urllib.request.Request(
        url.rstrip("/") + "/api/publish",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"apikey {api_key.reveal()}",
                 "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            print(response.read().decode())
            return 0
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        with contextlib.suppress(ValueError, AttributeError):
            detail = json.loads(detail).get("message", detail)
        print(f"wsserver: publish failed: {exc.code}: {detail}", file=sys.stderr)
        if exc.code == 404:
            print(f"wsserver: {url} serves no API: a server with --internal-port serves "
                  "/api/ only there (give the same --internal-port, or --url "
                  "http://127.0.0.1:PORT), and one without --api-key-file has no API",
                  file=sys.stderr)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"wsserver: cannot reach {url}: {reason}", file=sys.stderr)
    return EXIT_RUNTIME


def _api_url(options: dict[str, Any]) -> str:
    """The server API's base URL: the internal listener when there is one."""
    if options["internal_port"] is not None:
        scheme, host, port = "http", options["internal_host"], options["internal_port"]
    else:
        scheme = "https" if options["certfile"] else "http"
        host, port = options["host"], options["port"]
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}"


def _room_list(text: str | None) -> list[str] | None:
    """A ``--rooms``/``--publish`` comma list (so a room name with ',' cannot be given)."""
    if text is None:
        return None
    return [part.strip() for part in text.split(",") if part.strip()]


def _supervise(settings: Settings) -> int:
    import os

    from wsserver.edge.supervisor import Supervisor
    from wsserver.sdnotify import SystemdNotifier

    notifier = SystemdNotifier.from_environ(os.environ)
    # The supervisor speaks for the service; workers and task processes must not.
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        os.environ.pop(name, None)
    return Supervisor(settings, notifier).run()


def _serve(settings: Settings) -> int:
    from wsserver.edge.server import Server

    try:
        logconfig.configure(settings.log_format, settings.log_level, settings.log_config)
    except ConfigError as error:
        for problem in error.problems:
            print(f"wsserver: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    if not settings.log_config:
        # Our formats show no thread, process or source line: skip working them
        # out for every record (the logging HOWTO's "Optimization" section). Two
        # lines per connection make this a measurable part of a connect. A
        # --log-config file may show them.
        logging.logThreads = False
        logging.logProcesses = False
        logging.logMultiprocessing = False
        skip_source_lookup()
    log = logging.getLogger("wsserver")
    try:
        if settings.workers > 1:
            return _supervise(settings)
        server = Server(settings)
        loops.run(server.serve(), settings.loop)
    except ConfigError as error:
        for problem in error.problems:
            log.error("%s", problem)
        return EXIT_CONFIG
    except OSError as exc:
        # Almost always the bind (port taken, address not on this host): a start-up
        # error like a bad configuration, so the same exit code.
        log.error("cannot serve on %s:%d: %s", settings.host, settings.port, exc.strerror or exc)
        return EXIT_CONFIG
    return 0
