"""The local CA in the state directory: its files, the leaf it issues, the bundle it joins.

Every file here is the daemon's own, and tools trust what it publishes (for
Adobe too), so each is opened as :mod:`broker.files` opens private files: the
directory only this user may change, no symlink followed, no file another user
owns or may write; each is written atomically with its mode from its first byte.
"""

from __future__ import annotations

import fcntl
import os
import stat
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import certifi

from broker.errors import TlsError, UnsafePath
from broker.files import (
    atomic_write,
    check_dir,
    make_private_dir,
    open_private,
    read_private,
    state_dir,
)
from broker.tls import certs

if TYPE_CHECKING:  # only for annotations: cryptography costs the daemon 8-11 MiB of RSS
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey


@dataclass(frozen=True)
class TlsFiles:
    """The files of the local CA and leaf in one state directory (drawn in :mod:`broker.tls`)."""

    directory: Path

    @classmethod
    def default(cls) -> TlsFiles:
        return cls(state_dir())

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def leaf(self) -> Path:
        return self.directory / "leaf.pem"

    @property
    def bundle(self) -> Path:
        return self.directory / "ca-bundle.crt"

    @property
    def lock(self) -> Path:
        return self.directory / ".tls.lock"


# -- the CA -----------------------------------------------------------------------------


def init_ca(
    files: TlsFiles, *, now: float | None = None, hostname: str | None = None
) -> tuple[bool, certs.CertInfo]:
    """Create the local CA unless one exists; return (created, the CA certificate's info).

    An existing CA is left alone but checked: a missing or foreign key, or a
    certificate without the loopback name constraints, raises TlsError naming
    the files. ``ca.crt`` is written last, so its presence means the CA is
    complete; a key without a certificate (a crash) is replaced.
    """
    try:
        make_private_dir(files.directory)  # 0700; refused if another user could change it
    except UnsafePath as exc:
        raise TlsError(str(exc)) from None
    with _locked(files):
        if os.path.lexists(files.ca_cert):
            _, cert = load_ca(files)
            return False, certs.cert_info(cert, files.ca_cert)
        key = certs.new_key()
        cert = certs.build_ca(key, time.time() if now is None else now, hostname)
        atomic_write(files.ca_key, certs.key_pem(key), 0o600)
        atomic_write(files.ca_cert, certs.cert_pem(cert), 0o644)
    return True, certs.cert_info(cert, files.ca_cert)


def load_ca(files: TlsFiles) -> tuple[EllipticCurvePrivateKey, x509.Certificate]:
    """The CA key and certificate, checked to belong together; TlsError names the file."""
    from cryptography.hazmat.primitives.asymmetric import ec

    checked_dir(files.directory)
    cert = certs.parse_cert(read_own(files.ca_cert, "the local CA certificate"), files.ca_cert)
    certs.check_constraints(cert, files.ca_cert, start_over(files))
    key = certs.parse_key(read_own(files.ca_key, "the local CA key"), files.ca_key)
    redo = f"remove {files.ca_cert} and {files.ca_key} and run `token-broker tls init` again"
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not certs.same_key(key, cert):
        raise TlsError(f"the local CA key {files.ca_key} does not match {files.ca_cert}: {redo}")
    return key, cert


def start_over(files: TlsFiles) -> str:
    """What to do about a local CA that cannot be used: the files to remove, in words."""
    return (
        f"to start over, remove {files.ca_cert}, {files.ca_key}, {files.leaf} and "
        f"{files.bundle}, run `token-broker tls init`, and give clients the new {files.ca_cert}"
    )


# -- the leaf ---------------------------------------------------------------------------


def issue_leaf(
    files: TlsFiles,
    hosts: Iterable[str] = (),
    *,
    now: float | None = None,
    lifetime: float = certs.LEAF_LIFETIME,
) -> certs.CertInfo:
    """Issue a new leaf for localhost, 127.0.0.1, ::1 and ``hosts``; write it to ``leaf.pem``.

    The file is replaced atomically (key and certificate together); a running
    server picks it up with :func:`broker.tls.reload_cert_chain`. The leaf never
    outlives the CA.
    """
    addresses = certs.leaf_hosts(hosts)
    now = time.time() if now is None else now
    ca_key, ca_cert = load_ca(files)
    ca_end = certs.validity(ca_cert)[1]
    if ca_end <= now:
        raise TlsError(
            f"the local CA {files.ca_cert} expired at {certs.date(ca_end)}: remove it and "
            f"{files.ca_key}, run `token-broker tls init`, and give clients the new certificate"
        )
    key = certs.new_key()
    cert = certs.build_leaf(key, ca_key, ca_cert, addresses, now, lifetime)
    with _locked(files):
        atomic_write(files.leaf, certs.key_pem(key) + certs.cert_pem(cert), 0o600)
    return certs.cert_info(cert, files.leaf)


def ensure_leaf(
    files: TlsFiles,
    hosts: Iterable[str] = (),
    *,
    now: float | None = None,
    lifetime: float = certs.LEAF_LIFETIME,
) -> certs.CertInfo:
    """The current leaf if it is still good, else a newly issued one.

    Good: signed by the current CA, 0600, covering ``hosts``, not yet due for
    renewal, and no longer-lived than ``lifetime`` asks.
    """
    hosts = list(hosts)
    now = time.time() if now is None else now
    with suppress(TlsError):  # no leaf, or none to use: issue one
        leaf = certs.parse_cert(read_own(files.leaf, "the leaf"), files.leaf)
        _, ca_cert = load_ca(files)
        info = certs.cert_info(leaf, files.leaf)
        if (
            certs.signed_by(leaf, ca_cert)
            and not stat.S_IMODE(files.leaf.stat().st_mode) & 0o077
            and not info.missing(certs.leaf_hosts(hosts))
            and info.renew_at(now) > now
            and info.not_after - info.not_before <= lifetime * 1.1 + 1  # + the backdate
        ):
            return info
    return issue_leaf(files, hosts, now=now, lifetime=lifetime)


# -- the trust bundle and publication ---------------------------------------------------


class Bundle(NamedTuple):
    path: Path
    system: Path  # the system CA bundle it starts with
    source: str  # which one that is, in words
    changed: bool  # False: the file already had this content and was left alone


def system_ca_bundle() -> tuple[Path, str]:
    """The CAs requests trusts when REQUESTS_CA_BUNDLE is unset: certifi's bundle (a
    dependency of ours and of httpx; Debian's certifi package points at the OS bundle)."""
    return Path(certifi.where()), "certifi's CA bundle (requests' default)"


def write_bundle(files: TlsFiles, system: Path | None = None) -> Bundle:
    """Write ``ca-bundle.crt`` = the system CAs + the local CA; rewrite only if it changed.

    For ``REQUESTS_CA_BUNDLE``, which *replaces* requests' trust store: a tool
    given the local CA alone could no longer verify Adobe. So the CA must have
    its loopback name constraints (:func:`~broker.tls.certs.check_constraints`). ``system``
    defaults to :func:`system_ca_bundle`.
    """
    source = "the given CA bundle"
    if system is None:
        system, source = system_ca_bundle()
    checked_dir(files.directory)
    ca = read_own(files.ca_cert, "the local CA certificate", hint="run `token-broker tls init`")
    certs.check_constraints(certs.parse_cert(ca, files.ca_cert), files.ca_cert, start_over(files))
    base = certs.read_file(system, source)
    if not certs.PEM_CERT.search(base):
        raise TlsError(f"{source} {system} holds no PEM certificate")
    content = (
        base.rstrip(b"\n")
        + f"\n\n# token-broker local CA, from {files.ca_cert}\n".encode()
        + certs.pem_block(ca, files.ca_cert)
        + b"\n"
    )
    return Bundle(files.bundle, system, source, _write_public(files.bundle, content))


def publish(files: TlsFiles, directory: Path) -> None:
    """Copy the CA certificate and the CA bundle (public) into ``directory``, where other
    users can read them: the system unit's state directory is private to the service."""
    bundle = write_bundle(files)
    checked_dir(directory)  # tools trust what is found here: only we may change it
    for source, name in ((files.ca_cert, "ca.crt"), (bundle.path, "ca-bundle.crt")):
        _write_public(directory / name, read_own(source, "file"))


def published_ca(path: Path, fix: str | None = None) -> Path:
    """``path``, once it is a CA certificate tools may trust: a regular file only its
    owner may change, with the loopback name constraints. What `token-broker tls ca`
    prints: the caller's own CA, or the one the system service published in /run (another
    user's file, by design). ``fix``: how to start over (default: the files beside it)."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise TlsError(f"cannot read the CA certificate {path}: {certs.why(exc)}") from None
    if not stat.S_ISREG(st.st_mode) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise TlsError(f"the CA certificate {path} is not a regular file that only its owner "
                       "may change: remove it")  # fmt: skip
    fix = fix or (
        f"to start over, remove {path} (and the CA files beside it), run `token-broker "
        "tls init`, and give clients the new certificate"
    )
    cert = certs.parse_cert(certs.read_file(path, "the CA certificate"), path)
    certs.check_constraints(cert, path, fix)
    return path


# -- the state directory's files --------------------------------------------------------


def checked_dir(directory: Path) -> None:
    """The state directory exists and only this user can change it (TlsError otherwise)."""
    try:
        check_dir(directory)
    except FileNotFoundError:
        raise TlsError(f"{directory} does not exist: run `token-broker tls init`") from None
    except UnsafePath as exc:
        raise TlsError(str(exc)) from None


def read_own(path: Path, what: str, hint: str = "") -> bytes:
    """A file of the state directory: not through a symlink, and refused when another
    user owns it or may write it (:func:`broker.files.read_private`)."""
    try:
        return read_private(path)
    except UnsafePath as exc:
        raise TlsError(str(exc)) from None
    except OSError as exc:
        raise certs.read_error(exc, path, what, hint) from None


def _write_public(path: Path, content: bytes) -> bool:
    """Write the file of ours at ``path`` (0644) unless it holds ``content``; whether it did."""
    try:
        changed = read_private(path) != content
    except FileNotFoundError:
        changed = True
    except UnsafePath as exc:  # a symlink, or another user's file: replace nothing, say so
        raise TlsError(str(exc)) from None
    except OSError as exc:
        raise TlsError(f"cannot read {path}: {certs.why(exc)}") from None
    if changed:
        atomic_write(path, content, 0o644)
    return changed


@contextmanager
def _locked(files: TlsFiles) -> Iterator[None]:
    """Serialise writers (the daemon's `init` and a user's) across processes.

    The lock file is opened without following a symlink: root running `tls init`
    must not create or truncate a file that a planted ``.tls.lock`` points at.
    """
    try:
        fd = open_private(files.lock, os.O_RDWR | os.O_CREAT, 0o600)
    except UnsafePath as exc:
        raise TlsError(str(exc)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
