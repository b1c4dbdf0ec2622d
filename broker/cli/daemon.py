"""``serve`` and ``demo``: the daemon in the foreground.

What ``serve`` imports before the daemon answers is its start-up time: everything
is imported inside the commands, nothing at module level but the standard
library's argparse and sys.
"""

from __future__ import annotations

import argparse
import sys


def serve(args: argparse.Namespace) -> int:
    from broker import config, daemon, logs, server, systemd
    from broker.cli import hangup_pending

    settings = config.load(args.config, serving=True)
    redactor = logs.Redactor()
    logs.setup(redactor, args.log_format)
    server.harden()
    # Socket activation: systemd (or systemd-socket-activate) bound them for us.
    sockets = systemd.listen_sockets(allow_remote=settings.server.allow_remote)
    own: list[tuple[str, int, int]] = []
    if not sockets:
        sockets = server.open_listeners(settings.server)
        own = server.socket_files(settings.server)
    try:
        server.run(
            daemon.serve(settings, sockets, redactor=redactor, hangup_pending=hangup_pending)
        )
    finally:
        server.remove_socket_files(own)  # never the ones systemd passed
    return 0


def demo(args: argparse.Namespace) -> int:
    from broker import logs, server
    from broker.demo import run as run_demo
    from broker.schema import parse_duration

    if args.config is not None:
        print(
            "token-broker: demo takes no --config: it runs an issuer and a credential of its "
            f"own and reads no config; to serve {args.config}, run `token-broker serve "
            f"--config {args.config}`",
            file=sys.stderr,
        )
        return 2
    try:
        lifetime = parse_duration(args.lifetime)
    except ValueError as exc:
        print(f"token-broker: --lifetime: {exc}", file=sys.stderr)
        return 2
    if lifetime < 2:
        print("token-broker: --lifetime must be at least 2 seconds", file=sys.stderr)
        return 2
    rotate_every = None
    if args.rotate_every is not None:
        try:
            rotate_every = parse_duration(args.rotate_every)
        except ValueError as exc:
            print(f"token-broker: --rotate-every: {exc}", file=sys.stderr)
            return 2
        if rotate_every < 5:
            print("token-broker: --rotate-every must be at least 5 seconds", file=sys.stderr)
            return 2
    redactor = logs.Redactor()
    logs.setup(redactor, args.log_format)
    return server.run(run_demo(args.listen, lifetime, redactor, rotate_every))
