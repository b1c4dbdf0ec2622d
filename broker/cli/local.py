"""The commands about this host alone: ``serve`` and ``demo`` (the daemon in the
foreground), ``doctor`` (the checks are in :mod:`broker.doctor`) and ``tls`` (the
local CA; the work is in :mod:`broker.tls`).

What ``serve`` imports before the daemon answers is its start-up time: the broker's
modules are imported inside the commands (only `broker.errors`, which imports nothing,
and this package at module level).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from broker.cli import Usage, print_result, warn
from broker.errors import BrokerError


def doctor(args: argparse.Namespace) -> int:
    from broker.doctor import run_checks

    checks = run_checks(args.config, offline=args.offline)
    failed = any(c.ok is False for c in checks)
    rows = [{"verdict": c.verdict, "check": c.text} for c in checks]
    print_result(args, {"ok": not failed, "checks": rows},
                 "\n".join(f"{c.verdict:>4}  {c.text}" for c in checks))  # fmt: skip
    return 1 if failed else 0


def tls_command(args: argparse.Namespace) -> int:
    import os

    from broker import tls
    from broker.tokens import rfc3339

    files = tls.TlsFiles.default()
    if args.tls_command == "init":
        created, ca = tls.init_ca(files)
        valid = f"valid until {rfc3339(ca.not_after)}"
        if created:
            print(
                f"created a local CA: {ca.path} ({valid}), private key {files.ca_key} "
                "(mode 0600); clients trust it through `token-broker tls ca [--bundle]`"
            )
        else:
            print(f"a local CA exists already: {ca.path} ({valid}); left alone")
        return 0
    # The system service keeps its CA in a directory private to it, and publishes the
    # public parts in its runtime directory: that is where other users find them.
    # Either is checked before it is printed: tools trust what this prints, for Adobe too.
    published = Path("/run/token-broker")
    if not args.bundle:
        for candidate in (files.ca_cert, published / "ca.crt"):
            if os.path.lexists(candidate):
                fix = tls.start_over(files) if candidate == files.ca_cert else None
                print(tls.published_ca(candidate, fix))  # alone on stdout, for $(...)
                return 0
        raise BrokerError(
            f"the local CA certificate {files.ca_cert} does not exist: run `token-broker tls init`"
        )
    if not os.path.lexists(files.ca_cert) and (published / "ca-bundle.crt").is_file():
        tls.published_ca(published / "ca.crt")
        print(published / "ca-bundle.crt")  # the system service's, kept current by it
        return 0
    bundle = tls.write_bundle(files)
    done = f"wrote {bundle.path}" if bundle.changed else f"{bundle.path} is up to date"
    warn(f"{done}: {bundle.source} ({bundle.system}) + the token-broker CA ({files.ca_cert})")
    print(bundle.path)  # alone on stdout, like `tls ca`
    return 0


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

    if args.config is not None:
        raise Usage(
            "demo takes no --config: it runs an issuer and a credential of its own and reads "
            f"no config; to serve {args.config}, run `token-broker serve --config {args.config}`"
        )
    lifetime = _duration("--lifetime", args.lifetime, 2)
    rotate_every = None
    if args.rotate_every is not None:
        rotate_every = _duration("--rotate-every", args.rotate_every, 5)
    redactor = logs.Redactor()
    logs.setup(redactor, args.log_format)
    return server.run(run_demo(args.listen, lifetime, redactor, rotate_every))


def _duration(option: str, text: str, least: float) -> float:
    from broker.schema import parse_duration

    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise Usage(f"{option}: {exc}") from None
    if seconds < least:
        raise Usage(f"{option} must be at least {least:g} seconds")
    return seconds
