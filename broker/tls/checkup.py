"""What `token-broker doctor` says of the local CA and its leaf."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from broker.checks import Check
from broker.errors import TlsError
from broker.tls import certs
from broker.tls.localca import TlsFiles, load_ca, read_own

if TYPE_CHECKING:  # only for annotations: cryptography costs the daemon 8-11 MiB of RSS
    from cryptography import x509

#: doctor warns when the CA has less than this left.
CA_WARN_REMAINING = 365 * 86400.0


def doctor(files: TlsFiles, hosts: Iterable[str] = (), *, now: float | None = None) -> list[Check]:
    """Check the local CA and the leaf; ``hosts`` are the HTTPS listen hosts."""
    now = time.time() if now is None else now
    if not os.path.lexists(files.ca_cert):
        why = f"no local CA in {files.directory} yet: `token-broker tls init` creates one"
        return [Check(None, why + " (the daemon does it at start when ims_listen is set)")]
    checks = [_key_file_check(files.ca_key, "local CA key")]
    try:
        _, ca_cert = load_ca(files)
    except TlsError as exc:
        return [*checks, Check(False, str(exc))]
    checks.append(_ca_check(ca_cert, files.ca_cert, now))
    if not os.path.lexists(files.leaf):
        return [*checks, Check(None, f"no leaf certificate {files.leaf}: the daemon issues it")]
    checks.append(_key_file_check(files.leaf, "leaf key file"))
    try:
        leaf = certs.parse_cert(read_own(files.leaf, "the leaf"), files.leaf)
    except TlsError as exc:
        return [*checks, Check(False, str(exc))]
    checks.append(_leaf_check(leaf, ca_cert, files.leaf, list(hosts), now))
    return checks


def _key_file_check(path: Path, what: str) -> Check:
    try:
        st = path.stat()
    except OSError as exc:
        return Check(False, f"{what} {path}: {certs.why(exc)}")
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != os.getuid():
        return Check(
            False,
            f"{what} {path} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()}): "
            "run doctor as the daemon's user, or chown the file to it",
        )
    if mode & 0o077:
        return Check(
            False, f"{what} {path} has mode {mode:04o}: others can read it; run `chmod 600 {path}`"
        )
    return Check(True, f"{what} {path} has mode {mode:04o}, owned by this user")


def _ca_check(cert: x509.Certificate, path: Path, now: float) -> Check:
    end = certs.validity(cert)[1]  # its name constraints were checked when it was loaded
    if end <= now:
        return Check(False, f"local CA {path} expired at {certs.date(end)}")
    if end - now < CA_WARN_REMAINING:
        return Check(
            None,
            f"local CA {path} expires at {certs.date(end)}: plan a new CA and tell its clients",
        )
    return Check(True, f"local CA {path} valid until {certs.date(end)}, loopback names only")


def _leaf_check(
    leaf: x509.Certificate, ca: x509.Certificate, path: Path, hosts: list[str], now: float
) -> Check:
    info = certs.cert_info(leaf, path)
    if not certs.signed_by(leaf, ca):
        return Check(False, f"leaf {path} is not signed by the local CA: the daemon reissues it")
    if info.not_after <= now:
        return Check(
            False,
            f"leaf {path} expired at {certs.date(info.not_after)}: the daemon renews it at start "
            "and before expiry; if it is running, renewal is failing (see its log)",
        )
    if missing := info.missing(hosts):
        return Check(False, f"leaf {path} does not name {', '.join(missing)}")
    names = ", ".join((*info.dns_names, *info.ip_addresses))
    return Check(True, f"leaf {path} valid until {certs.date(info.not_after)} for {names}")
