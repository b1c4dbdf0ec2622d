"""TLS for the HTTPS (IMS-compatible) listener: a local CA, its leaf, server contexts.

DESIGN §10. Nothing here is imported unless TLS is configured, and nothing here
imports ``cryptography`` at module level: a broker without ``ims_listen`` must
not pay for it (8-11 MiB of RSS once keys are made, cryptography 38 to 50).

The local CA lives in the state directory (:func:`state_dir`)::

    STATE/                  0700 when token-broker creates it
      ca.crt   0644         the CA certificate: what clients trust (`token-broker tls ca`)
      ca.key   0600         the CA private key (ECDSA P-256, PKCS#8, unencrypted)
      leaf.pem 0600         the daemon's leaf: private key, then certificate, in ONE file
      ca-bundle.crt 0644    system CAs + ca.crt (`token-broker tls ca --bundle`)
      .tls.lock 0600        serialises `init` and leaf issuance between processes

Security decisions, each with its test in tests/test_tls.py:

- The CA certificate carries **name constraints** permitting only
  ``127.0.0.0/8``, ``::1/128`` and ``localhost``, and ``pathlen 0``. The CA
  ends up in ``REQUESTS_CA_BUNDLE`` of tools that also talk to Adobe; whoever
  steals its key can still only vouch for loopback names, never for
  ``ims-na1.adobelogin.com``. OpenSSL (Python, curl, Node) enforces this on the
  trust anchor. So the local CA cannot serve a non-loopback ``ims_listen``: use
  ``tls_cert`` / ``tls_key`` there (:func:`load_cert_files`).
- Private keys are born 0600 (``O_EXCL`` with mode 0600, write, fsync,
  rename): there is no moment at which another user could open them.
- ECDSA P-256 for both keys: a key takes 0.03 ms to generate where RSA-2048
  takes 0.2 s and RSA-3072 0.6 s (measured here; the daemon issues its leaf at
  every start and renewal, on the event loop's machine); the handshake is
  smaller and faster; 128-bit security like RSA-3072; every client in scope
  (OpenSSL behind Python/requests/urllib3, curl, Node; Java) supports it.
  Nothing in umapi-client or the User Sync Tool needs RSA.
- The leaf key and certificate share one file, replaced atomically, so a
  reader (this process reloading, or ``doctor``) never sees a new key with an
  old certificate. It lives on disk beside the CA key, with the same
  protection: the CA key is strictly more powerful, so keeping the leaf key
  in memory only would protect nothing, and on disk ``doctor`` and
  ``openssl`` can inspect it.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import re
import socket
import ssl
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from broker.errors import TlsError, UnsafePath
from broker.files import (
    atomic_write,
    check_dir,
    make_private_dir,
    open_private,
    read_private,
    state_dir,
)

if TYPE_CHECKING:  # only for annotations: cryptography costs the daemon 8-11 MiB of RSS
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

#: The CA certificate is copied into clients' trust stores; replacing it means
#: reconfiguring every tool, so it lives long. Its key never leaves the host and its
#: name constraints bound the damage if it does. 10 years (DESIGN §10).
CA_LIFETIME = 10 * 365.25 * 86400.0
#: The leaf is ours alone to replace, cheaply and without a restart, so it lives
#: short: 7 days bounds the use of a leaf key that leaked (e.g. via a backup), and
#: renewing at 2/3 leaves 2.3 days for a daemon that was suspended or failing.
LEAF_LIFETIME = 7 * 86400.0
#: Renew a leaf when this fraction of its life has passed.
RENEW_FRACTION = 2 / 3
#: Certificates start a little in the past: a clock stepped back by NTP right after
#: boot must not make a fresh certificate "not yet valid". At most a tenth of the
#: lifetime, so that a short test leaf is not born past its renewal point.
BACKDATE = 300.0
#: doctor warns when the CA has less than this left.
CA_WARN_REMAINING = 365 * 86400.0

LOOPBACK_NETWORKS = ("127.0.0.0/8", "::1/128")
LOOPBACK_NAME = "localhost"

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
_OS_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Alpine
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
    "/etc/ssl/cert.pem",  # macOS, BSDs
)


# -- where ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """The files of the local CA and leaf in one state directory."""

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


@dataclass(frozen=True)
class CertInfo:
    """What the broker needs to know of a certificate; times are epoch seconds."""

    path: Path
    subject: str
    serial: int
    not_before: float
    not_after: float
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]

    def renew_at(self, now: float) -> float:
        return renew_at(self.not_before, self.not_after, now)

    def missing(self, hosts: Iterable[str]) -> list[str]:
        """The listen hosts (IP literals or names) this certificate's SANs do not cover."""
        ips = {ipaddress.ip_address(a) for a in self.ip_addresses}
        names = {n.lower() for n in self.dns_names}
        out = []
        for host in hosts:
            host = host.strip("[]")
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                if host.lower() not in names:
                    out.append(host)
                continue
            if not address.is_unspecified and address not in ips:
                out.append(host)  # a wildcard bind has no name a client would verify
        return out


def renew_at(not_before: float, not_after: float, now: float) -> float:
    """When to replace a certificate valid from ``not_before`` to ``not_after``.

    At :data:`RENEW_FRACTION` of its life, or ``now`` if that moment has passed.
    """
    return max(now, not_before + RENEW_FRACTION * (not_after - not_before))


# -- the local CA -----------------------------------------------------------------------


def init_ca(
    files: TlsFiles, *, now: float | None = None, hostname: str | None = None
) -> tuple[bool, CertInfo]:
    """Create the local CA unless one exists; return (created, the CA certificate's info).

    An existing CA is left alone but checked: a missing or foreign key, or a
    certificate without the loopback name constraints, raises TlsError naming
    the files. ``ca.crt`` is written last, so its presence means the CA is
    complete; a key without a certificate (a crash) is replaced.
    """
    _private_dir(files.directory)
    with _locked(files):
        if os.path.lexists(files.ca_cert):
            _, cert = _load_ca(files)
            return False, _info(cert, files.ca_cert)
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.generate_private_key(ec.SECP256R1())
        cert = _build_ca(key, time.time() if now is None else now, hostname)
        atomic_write(files.ca_key, _key_pem(key), 0o600)
        atomic_write(files.ca_cert, _cert_pem(cert), 0o644)
    return True, _info(cert, files.ca_cert)


def _build_ca(key: EllipticCurvePrivateKey, now: float, hostname: str | None) -> x509.Certificate:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    host = (hostname or socket.gethostname() or "unknown host")[:40]  # CN is at most 64
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"token-broker local CA ({host})"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "token-broker"),
        ]
    )
    permitted: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_network(net)) for net in LOOPBACK_NETWORKS
    ]
    permitted.append(x509.DNSName(LOOPBACK_NAME))
    usage = _key_usage(key_cert_sign=True, crl_sign=True)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_when(now - BACKDATE))
        .not_valid_after(_when(now + CA_LIFETIME))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        # RFC 5280 §4.2.1.10: name constraints MUST be critical.
        .add_extension(x509.NameConstraints(permitted, None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _load_ca(files: TlsFiles) -> tuple[EllipticCurvePrivateKey, x509.Certificate]:
    """The CA key and certificate, checked to belong together; TlsError names the file."""
    from cryptography.hazmat.primitives.asymmetric import ec

    _checked_dir(files.directory)
    cert = _parse_cert(_read_own(files.ca_cert, "the local CA certificate"), files.ca_cert)
    check_constraints(cert, files.ca_cert, start_over(files))
    key = _parse_key(_read_own(files.ca_key, "the local CA key"), files.ca_key)
    redo = f"remove {files.ca_cert} and {files.ca_key} and run `token-broker tls init` again"
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not _same_key(key, cert):
        raise TlsError(f"the local CA key {files.ca_key} does not match {files.ca_cert}: {redo}")
    return key, cert


def start_over(files: TlsFiles) -> str:
    """What to do about a local CA that cannot be used: the files to remove, in words."""
    return (
        f"to start over, remove {files.ca_cert}, {files.ca_key}, {files.leaf} and "
        f"{files.bundle}, run `token-broker tls init`, and give clients the new {files.ca_cert}"
    )


def check_constraints(cert: x509.Certificate, path: Path, fix: str) -> None:
    """Raise TlsError unless the CA certificate ``cert`` vouches for loopback names only.

    Its name constraints must permit nothing but subnets of ``127.0.0.0/8`` and
    ``::1/128`` and the name ``localhost``: a CA without them, planted where the
    broker keeps its own, would be published in the bundle tools trust for
    Adobe too, and could then vouch for ``ims-na1.adobelogin.com``. ``fix``
    says how to start over.
    """
    from cryptography import x509

    try:
        constraints = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        why = "has no name constraints"
    else:
        permitted = constraints.permitted_subtrees or []
        foreign = [_shown(name) for name in permitted if not _loopback_subtree(name)]
        if not permitted:
            why = "has name constraints that permit every name"
        elif foreign:
            why = f"has name constraints that permit more than loopback ({', '.join(foreign[:3])})"
        else:
            return
    raise TlsError(
        f"the local CA certificate {path} {why}, so it could vouch for any host "
        f"(ims-na1.adobelogin.com included) and token-broker does not use it: {fix}"
    )


def _loopback_subtree(name: x509.GeneralName) -> bool:
    from cryptography import x509

    if isinstance(name, x509.DNSName):
        return name.value.lower() == LOOPBACK_NAME
    if isinstance(name, x509.IPAddress) and isinstance(
        name.value, ipaddress.IPv4Network | ipaddress.IPv6Network
    ):
        return any(
            name.value.version == loop.version and name.value.subnet_of(loop)  # type: ignore[arg-type]
            for loop in map(ipaddress.ip_network, LOOPBACK_NETWORKS)
        )
    return False


def _shown(name: x509.GeneralName) -> str:
    return f"{type(name).__name__} {name.value}"[:80]


# -- the leaf ---------------------------------------------------------------------------


def leaf_hosts(hosts: Iterable[str]) -> list[str]:
    """The IP literals a leaf names: 127.0.0.1, ::1 and each listen host, deduplicated.

    Raises TlsError for a host outside loopback: the local CA's name constraints
    make such a leaf worthless, so say so now rather than at the client.
    """
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    for host in hosts:
        host = host.strip("[]")
        if host.lower() == LOOPBACK_NAME:
            continue
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise TlsError(f"listen host {host!r} is not an IP address") from None
        if not address.is_loopback:
            raise TlsError(
                f"the local CA signs loopback names only (its name constraints), not {host}: "
                "set [server] tls_cert and tls_key to a certificate for that address"
            )
        if address not in found:
            found.append(address)
    return [str(a) for a in found]


def issue_leaf(
    files: TlsFiles,
    hosts: Iterable[str] = (),
    *,
    now: float | None = None,
    lifetime: float = LEAF_LIFETIME,
) -> CertInfo:
    """Issue a new leaf for localhost, 127.0.0.1, ::1 and ``hosts``; write it to ``leaf.pem``.

    The file is replaced atomically (key and certificate together); a running
    server picks it up with :func:`reload_cert_chain`. The leaf never outlives the CA.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    addresses = leaf_hosts(hosts)
    now = time.time() if now is None else now
    ca_key, ca_cert = _load_ca(files)
    ca_end = _validity(ca_cert)[1]
    if ca_end <= now:
        raise TlsError(
            f"the local CA {files.ca_cert} expired at {_date(ca_end)}: remove it and "
            f"{files.ca_key}, run `token-broker tls init`, and give clients the new certificate"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(LOOPBACK_NAME)]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    # A CN that is itself a permitted name: OpenSSL checks a CN that looks
                    # like a host name against the constraints when a leaf has no DNS SAN.
                    x509.NameAttribute(NameOID.COMMON_NAME, LOOPBACK_NAME),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "token-broker"),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_when(now - min(BACKDATE, lifetime / 10)))
        .not_valid_after(_when(min(now + lifetime, ca_end)))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    with _locked(files):
        atomic_write(files.leaf, _key_pem(key) + _cert_pem(cert), 0o600)
    return _info(cert, files.leaf)


def ensure_leaf(
    files: TlsFiles,
    hosts: Iterable[str] = (),
    *,
    now: float | None = None,
    lifetime: float = LEAF_LIFETIME,
) -> CertInfo:
    """The current leaf if it is still good, else a newly issued one.

    Good: signed by the current CA, 0600, covering ``hosts``, not yet due for
    renewal, and no longer-lived than ``lifetime`` asks.
    """
    hosts = list(hosts)
    now = time.time() if now is None else now
    current = _reusable_leaf(files, hosts, now, lifetime)
    return current or issue_leaf(files, hosts, now=now, lifetime=lifetime)


def _reusable_leaf(
    files: TlsFiles, hosts: list[str], now: float, lifetime: float
) -> CertInfo | None:
    try:
        leaf = _parse_cert(_read_own(files.leaf, "the leaf"), files.leaf)
        _, ca_cert = _load_ca(files)
        info = _info(leaf, files.leaf)
        good = (
            _signed_by(leaf, ca_cert)
            and not _loose_mode(files.leaf)
            and not info.missing(leaf_hosts(hosts))
            and info.renew_at(now) > now
            and info.not_after - info.not_before <= lifetime * 1.1 + 1  # + the backdate
        )
    except TlsError:
        return None
    return info if good else None


# -- server contexts --------------------------------------------------------------------


def server_context(cert_file: Path | str, key_file: Path | str | None = None) -> ssl.SSLContext:
    """A server SSLContext, TLS 1.2 or newer, with Python's default ciphers.

    ``key_file`` None: the key is in ``cert_file`` (``leaf.pem``). To renew
    without a restart, call :func:`reload_cert_chain` on the same context.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # What create_default_context(CLIENT_AUTH) adds, without loading the system CAs
    # (we do not verify clients: the client key is the proof).
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_SINGLE_ECDH_USE | ssl.OP_NO_COMPRESSION
    _load_chain(ctx, cert_file, key_file)
    return ctx


def reload_cert_chain(
    ctx: ssl.SSLContext, cert_file: Path | str, key_file: Path | str | None = None
) -> None:
    """Make new handshakes on ``ctx`` present the certificate now in the files.

    Connections already open keep theirs (each SSL object copies the
    certificate when it is created). The files are first tried on a scratch
    context: a failed load half-way on the live one could leave it with a
    certificate and no key. Call it on the event loop's thread: handshakes run
    there, so none can see the context between the certificate and the key.
    """
    _load_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert_file, key_file)
    _load_chain(ctx, cert_file, key_file)


def load_cert_files(
    cert_file: Path | str,
    key_file: Path | str,
    *,
    now: float | None = None,
    cert_what: str = "[server] tls_cert",
    key_what: str = "[server] tls_key",
) -> CertInfo:
    """Read and check user-provided ``tls_cert`` / ``tls_key`` (e.g. cert-manager's).

    Raises TlsError naming the file: missing, unreadable, not PEM, an encrypted
    key, a key that does not match the certificate, expired or not yet valid.
    Call it again on reload; then :func:`reload_cert_chain` or :func:`server_context`.
    """
    cert_path, key_path = Path(cert_file), Path(key_file)
    cert = _parse_cert(_read(cert_path, cert_what), cert_path, cert_what)
    key = _parse_key(_read(key_path, key_what), key_path, key_what)
    if not _same_key(key, cert):
        raise TlsError(f"{key_what} {key_path} is not the key of {cert_what} {cert_path}")
    info = _info(cert, cert_path)
    now = time.time() if now is None else now
    if info.not_after <= now:
        raise TlsError(f"{cert_what} {cert_path} expired at {_date(info.not_after)}")
    if info.not_before > now:
        raise TlsError(f"{cert_what} {cert_path} is not valid before {_date(info.not_before)}")
    return info


def _load_chain(ctx: ssl.SSLContext, cert_file: Path | str, key_file: Path | str | None) -> None:
    try:
        ctx.load_cert_chain(cert_file, key_file, password=_no_password)
    except TlsError as exc:  # from _no_password
        raise TlsError(f"{key_file or cert_file}: {exc}") from None
    except (ssl.SSLError, OSError) as exc:
        where = f"{cert_file}" + (f" and {key_file}" if key_file else "")
        raise TlsError(f"cannot load the certificate and key from {where}: {_why(exc)}") from None


def _no_password() -> str:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise TlsError("the private key is encrypted; token-broker needs it unencrypted (mode 0600)")


# -- trust bundle -----------------------------------------------------------------------


class Bundle(NamedTuple):
    path: Path
    system: Path  # the system CA bundle it starts with
    source: str  # which one that is, in words
    changed: bool  # False: the file already had this content and was left alone


def system_ca_bundle() -> tuple[Path, str]:
    """The CAs requests trusts when REQUESTS_CA_BUNDLE is unset: certifi's bundle.

    certifi is what requests uses by default (and a dependency of httpx, so it
    is here); without it, the operating system's bundle. Debian's certifi
    package itself points at the OS bundle.
    """
    try:
        import certifi
    except ImportError:
        pass
    else:
        return Path(certifi.where()), "certifi's CA bundle (requests' default)"
    for candidate in (ssl.get_default_verify_paths().cafile, *_OS_BUNDLES):
        if candidate and os.path.isfile(candidate):
            return Path(candidate), "the operating system's CA bundle"
    raise TlsError("no system CA bundle found: install certifi or the OS ca-certificates package")


def write_bundle(files: TlsFiles, system: Path | None = None) -> Bundle:
    """Write ``ca-bundle.crt`` = the system CAs + the local CA; rewrite only if it changed.

    For ``REQUESTS_CA_BUNDLE``, which *replaces* requests' trust store: a tool
    given the local CA alone could no longer verify Adobe. So the CA must have
    its loopback name constraints (:func:`check_constraints`). ``system``
    defaults to :func:`system_ca_bundle`.
    """
    source = "the given CA bundle"
    if system is None:
        system, source = system_ca_bundle()
    _checked_dir(files.directory)
    ca = _read_own(files.ca_cert, "the local CA certificate", hint="run `token-broker tls init`")
    check_constraints(_parse_cert(ca, files.ca_cert), files.ca_cert, start_over(files))
    base = _read(system, source)
    if not _PEM_CERT.search(base):
        raise TlsError(f"{source} {system} holds no PEM certificate")
    content = (
        base.rstrip(b"\n")
        + f"\n\n# token-broker local CA, from {files.ca_cert}\n".encode()
        + _PEM_CERT.search(ca).group(0)  # type: ignore[union-attr]
        + b"\n"
    )
    changed = _differs(files.bundle, content)
    if changed:
        atomic_write(files.bundle, content, 0o644)
    return Bundle(files.bundle, system, source, changed)


def published_ca(path: Path, fix: str | None = None) -> Path:
    """``path``, once it is a CA certificate tools may trust: a regular file only its
    owner may change, with the loopback name constraints. What `token-broker tls ca`
    prints: the caller's own CA, or the one the system service published in /run (another
    user's file, by design). ``fix``: how to start over (default: the files beside it)."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise TlsError(f"cannot read the CA certificate {path}: {_why(exc)}") from None
    if not stat.S_ISREG(st.st_mode) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise TlsError(f"the CA certificate {path} is not a regular file that only its owner "
                       "may change: remove it")  # fmt: skip
    fix = fix or (
        f"to start over, remove {path} (and the CA files beside it), run `token-broker "
        "tls init`, and give clients the new certificate"
    )
    check_constraints(_parse_cert(_read(path, "the CA certificate"), path), path, fix)
    return path


# -- doctor -----------------------------------------------------------------------------


class TlsCheck(NamedTuple):
    ok: bool | None  # None: a warning
    text: str


def doctor(
    files: TlsFiles, hosts: Iterable[str] = (), *, now: float | None = None
) -> list[TlsCheck]:
    """Check the local CA and the leaf; ``hosts`` are the HTTPS listen hosts."""
    now = time.time() if now is None else now
    if not os.path.lexists(files.ca_cert):
        return [
            TlsCheck(
                None,
                f"no local CA in {files.directory} yet: `token-broker tls init` creates one "
                "(the daemon does it at start when ims_listen is set)",
            )
        ]
    checks = [_key_file_check(files.ca_key, "local CA key")]
    try:
        _, ca_cert = _load_ca(files)
    except TlsError as exc:
        return [*checks, TlsCheck(False, str(exc))]
    checks.append(_ca_check(ca_cert, files.ca_cert, now))
    if not os.path.lexists(files.leaf):
        checks.append(TlsCheck(None, f"no leaf certificate {files.leaf}: the daemon issues it"))
        return checks
    checks.append(_key_file_check(files.leaf, "leaf key file"))
    try:
        leaf = _parse_cert(_read_own(files.leaf, "the leaf"), files.leaf)
    except TlsError as exc:
        return [*checks, TlsCheck(False, str(exc))]
    checks.append(_leaf_check(leaf, ca_cert, files.leaf, list(hosts), now))
    return checks


def _key_file_check(path: Path, what: str) -> TlsCheck:
    try:
        st = path.stat()
    except OSError as exc:
        return TlsCheck(False, f"{what} {path}: {_why(exc)}")
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != os.getuid():
        return TlsCheck(
            False,
            f"{what} {path} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()}): "
            "run doctor as the daemon's user, or chown the file to it",
        )
    if mode & 0o077:
        return TlsCheck(
            False, f"{what} {path} has mode {mode:04o}: others can read it; run `chmod 600 {path}`"
        )
    return TlsCheck(True, f"{what} {path} has mode {mode:04o}, owned by this user")


def _ca_check(cert: x509.Certificate, path: Path, now: float) -> TlsCheck:
    end = _validity(cert)[1]  # its name constraints were checked when it was loaded
    if end <= now:
        return TlsCheck(False, f"local CA {path} expired at {_date(end)}")
    if end - now < CA_WARN_REMAINING:
        return TlsCheck(
            None, f"local CA {path} expires at {_date(end)}: plan a new CA and tell its clients"
        )
    return TlsCheck(True, f"local CA {path} valid until {_date(end)}, loopback names only")


def _leaf_check(
    leaf: x509.Certificate, ca: x509.Certificate, path: Path, hosts: list[str], now: float
) -> TlsCheck:
    info = _info(leaf, path)
    if not _signed_by(leaf, ca):
        return TlsCheck(False, f"leaf {path} is not signed by the local CA: the daemon reissues it")
    if info.not_after <= now:
        return TlsCheck(
            False,
            f"leaf {path} expired at {_date(info.not_after)}: the daemon renews it at start "
            "and before expiry; if it is running, renewal is failing (see its log)",
        )
    if missing := info.missing(hosts):
        return TlsCheck(False, f"leaf {path} does not name {', '.join(missing)}")
    names = ", ".join((*info.dns_names, *info.ip_addresses))
    return TlsCheck(True, f"leaf {path} valid until {_date(info.not_after)} for {names}")


# -- helpers ----------------------------------------------------------------------------


def _private_dir(directory: Path) -> None:
    """Create (0700) or accept the state directory: TlsError when another user could
    change it."""
    try:
        make_private_dir(directory)
    except UnsafePath as exc:
        raise TlsError(str(exc)) from None


def _checked_dir(directory: Path) -> None:
    """The state directory exists and only this user can change it (TlsError otherwise)."""
    try:
        check_dir(directory)
    except FileNotFoundError:
        raise TlsError(f"{directory} does not exist: run `token-broker tls init`") from None
    except UnsafePath as exc:
        raise TlsError(str(exc)) from None


def _read_own(path: Path, what: str, hint: str = "") -> bytes:
    """A file of the state directory: not through a symlink, and refused when another
    user owns it or may write it (:func:`broker.files.read_private`)."""
    try:
        return read_private(path)
    except UnsafePath as exc:
        raise TlsError(str(exc)) from None
    except FileNotFoundError:
        tail = f": {hint}" if hint else ""
        raise TlsError(f"{what} {path} does not exist{tail}") from None
    except PermissionError:
        raise TlsError(f"{what} {path} is not readable by this user (uid {os.getuid()})") from None
    except OSError as exc:
        raise TlsError(f"cannot read {what} {path}: {_why(exc)}") from None


def _differs(path: Path, content: bytes) -> bool:
    """Whether the file of ours at ``path`` is missing or holds other than ``content``."""
    try:
        return read_private(path) != content
    except FileNotFoundError:
        return True
    except UnsafePath as exc:  # a symlink, or another user's file: replace nothing, say so
        raise TlsError(str(exc)) from None
    except OSError as exc:
        raise TlsError(f"cannot read {path}: {_why(exc)}") from None


def _read(path: Path, what: str, hint: str = "") -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        tail = f": {hint}" if hint else ""
        raise TlsError(f"{what} {path} does not exist{tail}") from None
    except PermissionError:
        raise TlsError(f"{what} {path} is not readable by this user (uid {os.getuid()})") from None
    except OSError as exc:
        raise TlsError(f"cannot read {what} {path}: {_why(exc)}") from None


def _parse_cert(data: bytes, path: Path, what: str = "") -> x509.Certificate:
    """The first certificate in a PEM file (a chain file starts with its leaf)."""
    from cryptography import x509

    found = _PEM_CERT.search(data)
    try:
        if found is None:
            raise ValueError
        return x509.load_pem_x509_certificate(found.group(0))
    except ValueError:
        raise TlsError(f"{what or 'file'} {path} holds no readable PEM certificate") from None


def _parse_key(data: bytes, path: Path, what: str = "") -> PrivateKeyTypes:
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography's word for "encrypted, and no password given"
        raise TlsError(
            f"{what or 'key file'} {path} is encrypted: token-broker needs it unencrypted, "
            "mode 0600"
        ) from None
    except Exception:  # never quote the parser: it may echo key bytes
        raise TlsError(f"{what or 'key file'} {path} holds no readable PEM private key") from None
    return key


def _same_key(key: PrivateKeyTypes, cert: x509.Certificate) -> bool:
    from cryptography.hazmat.primitives import serialization

    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key.public_key().public_bytes(*fmt) == cert.public_key().public_bytes(*fmt)


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ``ca`` signed ``cert`` (cryptography 38 has no verify_directly_issued_by)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec

    if cert.issuer != ca.subject:
        return False
    public = ca.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or cert.signature_hash_algorithm is None:
        return False
    try:
        public.verify(
            cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
        )
    except InvalidSignature:
        return False
    return True


def _info(cert: x509.Certificate, path: Path) -> CertInfo:
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(a) for a in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns, ips = (), ()
    start, end = _validity(cert)
    return CertInfo(path, cert.subject.rfc4514_string(), cert.serial_number, start, end, dns, ips)


def _validity(cert: x509.Certificate) -> tuple[float, float]:
    """(not_before, not_after) in epoch seconds, on cryptography 38 and the newest alike."""
    try:  # cryptography >= 42; the naive properties warn there
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    except AttributeError:  # cryptography < 42: naive datetimes in UTC
        start = cert.not_valid_before.replace(tzinfo=UTC)
        end = cert.not_valid_after.replace(tzinfo=UTC)
    return start.timestamp(), end.timestamp()


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    from cryptography import x509

    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _key_pem(key: EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),  # the daemon reads it unattended; the file mode protects it
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _when(epoch: float) -> datetime:
    return datetime.fromtimestamp(int(epoch), UTC)  # X.509 times have whole seconds


def _date(epoch: float) -> str:
    return datetime.fromtimestamp(int(epoch), UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")  # KEY_VALUES_MISMATCH: key values mismatch
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _loose_mode(path: Path) -> bool:
    return bool(stat.S_IMODE(path.stat().st_mode) & 0o077)


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


# -- the daemon's certificate -------------------------------------------------------------


class ServerCertificate:
    """The certificate the daemon's HTTPS listeners present, kept current without a restart.

    With ``[server] tls_cert``/``tls_key`` (e.g. cert-manager's), those files,
    read again on reload. Otherwise a leaf of the local CA for localhost,
    127.0.0.1, ::1 and the HTTPS listen addresses: the CA is created if there is
    none yet, and a leaf is issued at start and renewed at 2/3 of its life
    (:meth:`renew_at`). Renewal and reload change the one SSLContext the
    listeners use, in place: new handshakes see the new certificate, open
    connections keep theirs.
    """

    def __init__(
        self,
        cert_file: str | None,
        key_file: str | None,
        hosts: Iterable[str],
        *,
        leaf_lifetime: float = LEAF_LIFETIME,
        files: TlsFiles | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.files = files or TlsFiles.default()
        self._clock = clock
        self._hosts = list(hosts)
        self._lifetime = leaf_lifetime
        self._user = (cert_file, key_file) if cert_file and key_file else None
        self.info = self._current()
        self.context = server_context(*self._chain())

    @property
    def local_ca(self) -> bool:
        """True when the certificate is a leaf of the broker's own CA."""
        return self._user is None

    def renew_at(self) -> float | None:
        """When the leaf is due (None for user files: cert-manager renews those)."""
        return self.info.renew_at(self._clock()) if self.local_ca else None

    def renew(self) -> CertInfo:
        """Issue a new leaf and make new handshakes present it."""
        self.info = issue_leaf(self.files, self._hosts, now=self._clock(), lifetime=self._lifetime)
        reload_cert_chain(self.context, *self._chain())
        return self.info

    def reload(self, cert_file: str | None, key_file: str | None, hosts: Iterable[str]) -> None:
        """Take a reloaded config's files (or hosts): read them again, in place."""
        self._user = (cert_file, key_file) if cert_file and key_file else None
        self._hosts = list(hosts)
        self.info = self._current()
        reload_cert_chain(self.context, *self._chain())

    def publish(self, directory: Path) -> None:
        """Copy the CA certificate and the CA bundle (public) where other users can read
        them: the system unit's state directory is private to the service."""
        if not self.local_ca:
            return
        bundle = write_bundle(self.files)
        _checked_dir(directory)  # tools trust what is found here: only we may change it
        for source, name in ((self.files.ca_cert, "ca.crt"), (bundle.path, "ca-bundle.crt")):
            target = directory / name
            content = _read_own(source, "file")
            if _differs(target, content):
                atomic_write(target, content, 0o644)

    def _current(self) -> CertInfo:
        if self._user is not None:
            return load_cert_files(*self._user, now=self._clock())
        init_ca(self.files, now=self._clock())  # the daemon runs `tls init` itself if need be
        return ensure_leaf(self.files, self._hosts, now=self._clock(), lifetime=self._lifetime)

    def _chain(self) -> tuple[str, str | None]:
        if self._user is not None:
            return self._user[0], self._user[1]  # type: ignore[return-value]
        return str(self.files.leaf), None
