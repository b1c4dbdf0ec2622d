"""The commands about this host alone: ``doctor`` (the checks are in
:mod:`broker.doctor`) and ``tls`` (the local CA; the work is in :mod:`broker.tls`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from broker.errors import BrokerError


def doctor(args: argparse.Namespace) -> int:
    from broker.doctor import run_checks

    checks = run_checks(args.config, offline=args.offline)
    failed = any(c.ok is False for c in checks)
    if args.json:
        rows = [{"verdict": c.verdict, "check": c.text} for c in checks]
        print(json.dumps({"ok": not failed, "checks": rows}, indent=2))
    else:
        for c in checks:
            print(f"{c.verdict:>4}  {c.text}")
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
    print(
        f"token-broker: {done}: {bundle.source} ({bundle.system}) + the token-broker CA "
        f"({files.ca_cert})",
        file=sys.stderr,
    )
    print(bundle.path)  # alone on stdout, like `tls ca`
    return 0
