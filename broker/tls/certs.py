"""X.509 certificates and keys of the local CA: built, read and judged, with no state.

Everything here works on bytes, certificates and keys already in hand (or one
file a user names); where the local CA keeps them and how they are opened safely
is :mod:`broker.tls.localca`. ``cryptography`` is imported inside each function
(see :mod:`broker.tls`).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from broker.errors import TlsError

if TYPE_CHECKING:  # only for annotations: cryptography costs the daemon 8-11 MiB of RSS
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

#: The CA certificate is copied into clients' trust stores; replacing it means
#: reconfiguring every tool, so it lives long. Its key never leaves the host and its
#: name constraints bound the damage if it does. 10 years.
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

#: What the local CA may vouch for (its name constraints), and nothing else.
LOOPBACK_V4 = ipaddress.IPv4Network("127.0.0.0/8")
LOOPBACK_V6 = ipaddress.IPv6Network("::1/128")
LOOPBACK_NAME = "localhost"

PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


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
    """When to replace a certificate: at :data:`RENEW_FRACTION` of its life, or ``now`` if that
    moment has passed."""
    return max(now, not_before + RENEW_FRACTION * (not_after - not_before))


def leaf_hosts(hosts: Iterable[str]) -> list[str]:
    """The IP literals a leaf names: 127.0.0.1, ::1 and each listen host, deduplicated.

    Raises TlsError for a host outside loopback: the local CA's name constraints
    make such a leaf worthless, so say so now rather than at the client.
    """
    found = [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
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


# -- building ---------------------------------------------------------------------------


def new_key() -> EllipticCurvePrivateKey:
    """A new ECDSA P-256 key (why not RSA: see :mod:`broker.tls`)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def build_ca(key: EllipticCurvePrivateKey, now: float, hostname: str | None) -> x509.Certificate:
    """The self-signed CA certificate of ``key``: loopback names only, no sub-CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    host = (hostname or socket.gethostname() or "unknown host")[:40]  # CN is at most 64
    name = _name(f"token-broker local CA ({host})")
    permitted: list[x509.GeneralName] = [
        x509.IPAddress(LOOPBACK_V4),
        x509.IPAddress(LOOPBACK_V6),
        x509.DNSName(LOOPBACK_NAME),
    ]
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_when(now - BACKDATE))
        .not_valid_after(_when(now + CA_LIFETIME))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        # RFC 5280 §4.2.1.10: name constraints MUST be critical.
        .add_extension(x509.NameConstraints(permitted, None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def build_leaf(
    key: EllipticCurvePrivateKey,
    ca_key: EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    addresses: list[str],
    now: float,
    lifetime: float,
) -> x509.Certificate:
    """The server certificate of ``key`` for localhost and ``addresses``, signed by the CA.

    It never outlives the CA, and starts at most a tenth of ``lifetime`` in the past.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    sans: list[x509.GeneralName] = [x509.DNSName(LOOPBACK_NAME)]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        # A CN that is itself a permitted name: OpenSSL checks a CN that looks like a host
        # name against the constraints when a leaf has no DNS SAN.
        .subject_name(_name(LOOPBACK_NAME))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_when(now - min(BACKDATE, lifetime / 10)))
        .not_valid_after(_when(min(now + lifetime, validity(ca_cert)[1])))
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


def _name(common_name: str) -> x509.Name:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cn = x509.NameAttribute(NameOID.COMMON_NAME, common_name)
    return x509.Name([cn, x509.NameAttribute(NameOID.ORGANIZATION_NAME, "token-broker")])


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


def key_pem(key: EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),  # the daemon reads it unattended; the file mode protects it
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


# -- judging ----------------------------------------------------------------------------


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
    if isinstance(name, x509.IPAddress) and isinstance(name.value, ipaddress.IPv4Network):
        return name.value.subnet_of(LOOPBACK_V4)
    if isinstance(name, x509.IPAddress) and isinstance(name.value, ipaddress.IPv6Network):
        return name.value.subnet_of(LOOPBACK_V6)
    return False


def _shown(name: x509.GeneralName) -> str:
    return f"{type(name).__name__} {name.value}"[:80]


def same_key(key: PrivateKeyTypes, cert: x509.Certificate) -> bool:
    """Whether ``key`` is the private half of ``cert``'s public key."""
    from cryptography.hazmat.primitives import serialization

    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key.public_key().public_bytes(*fmt) == cert.public_key().public_bytes(*fmt)


def signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
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


def cert_info(cert: x509.Certificate, path: Path) -> CertInfo:
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(a) for a in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns, ips = (), ()
    start, end = validity(cert)
    return CertInfo(path, cert.subject.rfc4514_string(), cert.serial_number, start, end, dns, ips)


def validity(cert: x509.Certificate) -> tuple[float, float]:
    """(not_before, not_after) in epoch seconds, on cryptography 38 and the newest alike."""
    try:  # cryptography >= 42; the naive properties warn there
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    except AttributeError:  # cryptography < 42: naive datetimes in UTC
        start = cert.not_valid_before.replace(tzinfo=UTC)
        end = cert.not_valid_after.replace(tzinfo=UTC)
    return start.timestamp(), end.timestamp()


# -- reading ----------------------------------------------------------------------------


def read_file(path: Path, what: str) -> bytes:
    """A file a user names (``tls_cert``, a CA bundle): TlsError says which and why not."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise read_error(exc, path, what) from None


def read_error(exc: OSError, path: Path, what: str, hint: str = "") -> TlsError:
    """The one sentence for a file that could not be read; ``hint``: what to do if missing."""
    if isinstance(exc, FileNotFoundError):
        tail = f": {hint}" if hint else ""
        return TlsError(f"{what} {path} does not exist{tail}")
    if isinstance(exc, PermissionError):
        return TlsError(f"{what} {path} is not readable by this user (uid {os.getuid()})")
    return TlsError(f"cannot read {what} {path}: {why(exc)}")


def pem_block(data: bytes, path: Path, what: str = "") -> bytes:
    """The first PEM certificate in ``data``, markers included (a chain starts with its leaf)."""
    if (found := PEM_CERT.search(data)) is None:
        raise _no_cert(path, what)
    return found.group(0)


def parse_cert(data: bytes, path: Path, what: str = "") -> x509.Certificate:
    """The first certificate in a PEM file (a chain file starts with its leaf)."""
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(pem_block(data, path, what))
    except ValueError:
        raise _no_cert(path, what) from None


def _no_cert(path: Path, what: str) -> TlsError:
    return TlsError(f"{what or 'file'} {path} holds no readable PEM certificate")


def parse_key(data: bytes, path: Path, what: str = "") -> PrivateKeyTypes:
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography's word for "encrypted, and no password given"
        raise TlsError(
            f"{what or 'key file'} {path} is encrypted: token-broker needs it unencrypted, "
            "mode 0600"
        ) from None
    except Exception:  # never quote the parser: it may echo key bytes
        raise TlsError(f"{what or 'key file'} {path} holds no readable PEM private key") from None


# -- words ------------------------------------------------------------------------------


def _when(epoch: float) -> datetime:
    return datetime.fromtimestamp(int(epoch), UTC)  # X.509 times have whole seconds


def date(epoch: float) -> str:
    return datetime.fromtimestamp(int(epoch), UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def why(exc: BaseException) -> str:
    """An OS or OpenSSL error in a few words."""
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")  # KEY_VALUES_MISMATCH: key values mismatch
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
