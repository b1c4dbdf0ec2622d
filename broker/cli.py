"""The ``token-broker`` command: ``main(argv) -> exit code``.

Exit codes: 0 success, 1 failure, 2 usage. Errors go to stderr in one or two
plain sentences, never with a traceback for an expected failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from broker import __version__
from broker.errors import BrokerError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="token-broker",
        description="Serve OAuth access tokens on loopback; the client secret stays here.",
    )
    parser.add_argument("--version", action="version", version=f"token-broker {__version__}")
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", metavar="PATH", help="config file (default: see README)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("serve", parents=[config], help="run the daemon in the foreground")
    demo = sub.add_parser(
        "demo", parents=[config], help="zero-setup demo: embedded issuer + broker"
    )
    demo.add_argument("--listen", default="127.0.0.1:8765", help="default 127.0.0.1:8765")
    demo.add_argument(
        "--lifetime", type=float, default=120.0, help="demo token lifetime in seconds"
    )
    token = sub.add_parser("token", parents=[config], help="print a token from the daemon")
    token.add_argument("name", nargs="?", help="credential (default: the default credential)")
    lst = sub.add_parser("list", parents=[config], help="show each credential's state")
    lst.add_argument("--json", action="store_true", help="print the status JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except BrokerError as exc:
        print(f"token-broker: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


def _serve(args: argparse.Namespace) -> int:
    from broker import config, server

    settings = config.load(args.config)
    server.setup_logging()
    sockets = server.open_listeners(settings.server)
    server.run(server.serve(settings, sockets))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from broker import demo, server

    if args.lifetime < 2:
        print("token-broker: --lifetime must be at least 2 seconds", file=sys.stderr)
        return 2
    server.setup_logging()
    return server.run(demo.run(args.listen, args.lifetime))


def _token(args: argparse.Namespace) -> int:
    path = "/token" if args.name is None else f"/token/{args.name}"
    response = _ask_daemon(args.config, path)
    if response.status_code != 200:
        return _daemon_error(response)
    sys.stdout.write(response.text + "\n")
    return 0


def _list(args: argparse.Namespace) -> int:
    response = _ask_daemon(args.config, "/v1/credentials")
    if response.status_code != 200:
        return _daemon_error(response)
    rows: list[dict[str, Any]] = response.json()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [("NAME", "PROVIDER", "STATE", "EXPIRES_AT", "LAST_ERROR")]
    for row in rows:
        err = row.get("last_error") or {}
        last = f"{err.get('error')}: {err.get('description')}" if err else "-"
        table.append((row["name"], row["provider"], row["state"], row["expires_at"] or "-", last))
    widths = [max(len(str(r[i])) for r in table) for i in range(4)]
    for r in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[4])
    return 0


def _ask_daemon(config_path: str | None, path: str) -> Any:
    """GET ``path`` from the running daemon at the config's first listen address."""
    import httpx

    from broker import config
    from broker.config import TcpListen

    settings = config.load(config_path)
    listen = settings.server.listen[0]
    headers = {}
    if settings.server.require_header:
        headers[settings.server.require_header] = "1"
    if isinstance(listen, TcpListen):
        transport = httpx.HTTPTransport()
        base = f"http://{listen}"
    else:
        transport = httpx.HTTPTransport(uds=listen.path)
        base = "http://localhost"
    try:
        with httpx.Client(transport=transport, timeout=30.0, trust_env=False) as client:
            return client.get(base + path, headers=headers)
    except httpx.HTTPError as exc:
        raise BrokerError(
            f"cannot reach the daemon at {listen} ({type(exc).__name__}); "
            "is `token-broker serve` running with this config?"
        ) from None


def _daemon_error(response: Any) -> int:
    try:
        body = response.json()
        message = f"{body['error']}: {body['detail']}"
    except (ValueError, KeyError, TypeError):
        message = f"HTTP {response.status_code}"
    print(f"token-broker: {message}", file=sys.stderr)
    return 1


_COMMANDS = {"serve": _serve, "demo": _demo, "token": _token, "list": _list}
