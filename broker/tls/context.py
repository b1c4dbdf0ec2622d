"""The HTTPS listeners' side: server SSL contexts, and the certificate kept current in them.

The certificate is a leaf of the local CA (:mod:`broker.tls.localca`) or the
user's ``[server] tls_cert`` / ``tls_key`` (e.g. cert-manager's); either way one
SSLContext serves every HTTPS listener and is changed in place on renewal and
reload, so no restart is needed.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from broker.errors import TlsError
from broker.tls import certs
from broker.tls.localca import TlsFiles, ensure_leaf, init_ca, issue_leaf, publish


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
) -> certs.CertInfo:
    """Read and check user-provided ``tls_cert`` / ``tls_key`` (e.g. cert-manager's).

    Raises TlsError naming the file: missing, unreadable, not PEM, an encrypted
    key, a key that does not match the certificate, expired or not yet valid.
    Call it again on reload; then :func:`reload_cert_chain` or :func:`server_context`.
    """
    cert_path, key_path = Path(cert_file), Path(key_file)
    cert = certs.parse_cert(certs.read_file(cert_path, cert_what), cert_path, cert_what)
    key = certs.parse_key(certs.read_file(key_path, key_what), key_path, key_what)
    if not certs.same_key(key, cert):
        raise TlsError(f"{key_what} {key_path} is not the key of {cert_what} {cert_path}")
    info = certs.cert_info(cert, cert_path)
    now = time.time() if now is None else now
    if info.not_after <= now:
        raise TlsError(f"{cert_what} {cert_path} expired at {certs.date(info.not_after)}")
    if info.not_before > now:
        raise TlsError(f"{cert_what} {cert_path} is not valid before {certs.date(info.not_before)}")
    return info


def _load_chain(ctx: ssl.SSLContext, cert_file: Path | str, key_file: Path | str | None) -> None:
    try:
        ctx.load_cert_chain(cert_file, key_file, password=_no_password)
    except TlsError as exc:  # from _no_password
        raise TlsError(f"{key_file or cert_file}: {exc}") from None
    except (ssl.SSLError, OSError) as exc:
        where = f"{cert_file}" + (f" and {key_file}" if key_file else "")
        raise TlsError(
            f"cannot load the certificate and key from {where}: {certs.why(exc)}"
        ) from None


def _no_password() -> str:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise TlsError("the private key is encrypted; token-broker needs it unencrypted (mode 0600)")


class ServerCertificate:
    """The certificate the daemon's HTTPS listeners present, kept current without a restart.

    With ``[server] tls_cert``/``tls_key`` (e.g. cert-manager's), those files,
    read again on reload. Otherwise a leaf of the local CA for localhost,
    127.0.0.1, ::1 and the HTTPS listen addresses: the CA is created if there is
    none yet, and a leaf is issued at start and renewed at 2/3 of its life
    (:meth:`renew_at`); both change the listeners' one SSLContext in place
    (:func:`reload_cert_chain`).
    """

    def __init__(
        self,
        cert_file: str | None,
        key_file: str | None,
        hosts: Iterable[str],
        *,
        leaf_lifetime: float = certs.LEAF_LIFETIME,
        files: TlsFiles | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.files = files or TlsFiles.default()
        self._clock = clock
        self._hosts = list(hosts)
        self._lifetime = leaf_lifetime
        self._user = _user_files(cert_file, key_file)
        self.info = self._current()
        self.context = server_context(*self._chain())

    @property
    def local_ca(self) -> bool:
        """True when the certificate is a leaf of the broker's own CA."""
        return self._user is None

    def renew_at(self) -> float | None:
        """When the leaf is due (None for user files: cert-manager renews those)."""
        return self.info.renew_at(self._clock()) if self.local_ca else None

    def renew(self) -> certs.CertInfo:
        """Issue a new leaf and make new handshakes present it."""
        self.info = issue_leaf(self.files, self._hosts, now=self._clock(), lifetime=self._lifetime)
        reload_cert_chain(self.context, *self._chain())
        return self.info

    def reload(self, cert_file: str | None, key_file: str | None, hosts: Iterable[str]) -> None:
        """Take a reloaded config's files (or hosts): read them again, in place."""
        self._user = _user_files(cert_file, key_file)
        self._hosts = list(hosts)
        self.info = self._current()
        reload_cert_chain(self.context, *self._chain())

    def publish(self, directory: Path) -> None:
        """:func:`broker.tls.localca.publish`, for a leaf of the local CA."""
        if self.local_ca:
            publish(self.files, directory)

    def _current(self) -> certs.CertInfo:
        if self._user is not None:
            return load_cert_files(*self._user, now=self._clock())
        init_ca(self.files, now=self._clock())  # the daemon runs `tls init` itself if need be
        return ensure_leaf(self.files, self._hosts, now=self._clock(), lifetime=self._lifetime)

    def _chain(self) -> tuple[str, str | None]:
        return self._user or (str(self.files.leaf), None)


def _user_files(cert_file: str | None, key_file: str | None) -> tuple[str, str] | None:
    """The user's (certificate, key) files, or None for a leaf of the local CA."""
    return (cert_file, key_file) if cert_file and key_file else None
