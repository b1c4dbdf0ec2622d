"""broker.tls: the local CA, its leaf, server contexts, bundle and doctor checks.

Handshakes are real: TLS servers on 127.0.0.1 (the ssl module in a thread,
asyncio and uvloop servers) and real clients (the ssl module, httpx, requests).
The "stolen CA key" tests sign leaves with the broker's own CA key and show
that clients refuse them; each has a control (the same key and subject in a CA
certificate without the constraint) that accepts the same leaf, so a refusal
can only come from the constraint under test.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import ssl
import stat
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import requests
import requests.adapters
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from helpers import ServerThread

from broker import tls
from broker.checks import Check
from broker.cli import main
from broker.errors import TlsError
from broker.files import state_dir

NOW = 1_800_000_000.0  # a fixed clock for the pure parts
DAY = 86400.0


@pytest.fixture
def files(tmp_path: Path) -> tls.TlsFiles:
    """A state directory holding a fresh local CA (created with the real clock)."""
    found = tls.TlsFiles(tmp_path / "state")
    tls.init_ca(found)
    return found


# -- test-side certificate builders (the attacker's and the "Adobe" side) ---------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _when(epoch: float) -> datetime:
    return datetime.fromtimestamp(int(epoch), UTC)


def _ca(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    subject: x509.Name,
    *,
    constraints: bool = False,
    pathlen: int | None = None,
) -> x509.Certificate:
    """A self-signed CA; with ``constraints`` the same name constraints as the broker's."""
    now = time.time()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_when(now - DAY))
        .not_valid_after(_when(now + 365 * DAY))
        .add_extension(x509.BasicConstraints(ca=True, path_length=pathlen), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_usage(cert_sign=True), critical=True)
    )
    if constraints:
        permitted = [
            x509.IPAddress(ipaddress.ip_network("127.0.0.0/8")),
            x509.IPAddress(ipaddress.ip_network("::1/128")),
            x509.DNSName("localhost"),
        ]
        builder = builder.add_extension(x509.NameConstraints(permitted, None), critical=True)
    return builder.sign(key, hashes.SHA256())


def _usage(*, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf(
    issuer_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    issuer: x509.Certificate,
    *,
    cn: str = "leaf",
    dns: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None,
    ca: bool = False,
    not_before: float | None = None,
    not_after: float | None = None,
) -> tuple[ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, x509.Certificate]:
    """A certificate signed by ``issuer_key`` (e.g. a stolen CA key)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = time.time()
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_when(now - DAY if not_before is None else not_before))
        .not_valid_after(_when(now + 30 * DAY if not_after is None else not_after))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    )
    if ca:
        builder = builder.add_extension(_usage(cert_sign=True), critical=True)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(issuer_key, hashes.SHA256())


def _pem(*items: object) -> bytes:
    out = b""
    for item in items:
        if isinstance(item, x509.Certificate):
            out += item.public_bytes(serialization.Encoding.PEM)
        else:
            out += item.private_bytes(  # type: ignore[attr-defined]
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
    return out


def _write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def _stolen(files: tls.TlsFiles) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The broker CA's key and certificate, as a thief who copied ca.key would hold them."""
    key = serialization.load_pem_private_key(files.ca_key.read_bytes(), None)
    cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key, cert


# -- TLS servers and clients on loopback ------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    ctx: ssl.SSLContext

    def finish_request(self, request, client_address):  # type: ignore[no-untyped-def]
        try:  # handshake in the handler thread, so one refusing client blocks nobody
            conn = self.ctx.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return  # the client refused our certificate: that is what the test looks at
        try:
            self.RequestHandlerClass(conn, client_address, self)
        finally:
            conn.close()  # wrap_socket detached `request`: shutdown_request cannot close it

    def handle_error(self, request, client_address):  # type: ignore[no-untyped-def]
        pass


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


class _Server6(_Server):
    address_family = socket.AF_INET6


class HttpsServer:
    """An HTTPS server on loopback presenting whatever ``ctx`` holds; answers 200 "ok"."""

    def __init__(self, ctx: ssl.SSLContext, host: str = "127.0.0.1") -> None:
        httpd = (_Server6 if ":" in host else _Server)((host, 0), _Handler)
        httpd.ctx = ctx
        self.port = httpd.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}/"
        self._serving = ServerThread(httpd).start()

    def close(self) -> None:
        self._serving.stop()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    """serve(cert, key) -> a running HttpsServer presenting that pair (closed at teardown)."""
    servers: list[HttpsServer] = []

    def start(key: object, *certs: x509.Certificate) -> HttpsServer:
        pem = _write(tmp_path / f"server-{len(servers)}.pem", _pem(key, *certs))
        servers.append(HttpsServer(tls.server_context(pem)))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _client(*cas: x509.Certificate | Path) -> ssl.SSLContext:
    """A client context trusting ``cas``, with the strict checks Python 3.13 turns on."""
    ctx = ssl.create_default_context(cadata="")
    for ca in cas:
        if isinstance(ca, Path):
            ctx.load_verify_locations(cafile=str(ca))
        else:
            ctx.load_verify_locations(cadata=ca.public_bytes(serialization.Encoding.PEM).decode())
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def _handshake(
    ctx: ssl.SSLContext, port: int, server_hostname: str, host: str = "127.0.0.1"
) -> int:
    """Connect to host:port verifying ``server_hostname``; the peer's serial number."""
    with socket.create_connection((host, port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_hostname) as conn:
            der = conn.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


class _PinnedHost(requests.adapters.HTTPAdapter):
    """requests with TLS verification against ``host`` while connecting to 127.0.0.1."""

    def __init__(self, host: str) -> None:
        self.host = host
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs["server_hostname"] = self.host
        super().init_poolmanager(*args, **kwargs)


def _requests_get(url: str, verify: str | bool, host: str | None = None) -> requests.Response:
    with requests.Session() as session:
        if host is not None:
            session.mount("https://", _PinnedHost(host))
        return session.get(url, verify=verify, timeout=10)


# -- state directory --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "euid", "expected"),
    [
        ({"HOME": "/home/u"}, 1000, "/home/u/.local/state/token-broker"),
        ({"HOME": "/home/u", "XDG_STATE_HOME": "/x/state"}, 1000, "/x/state/token-broker"),
        ({"HOME": "/home/u", "XDG_STATE_HOME": "rel/state"}, 1000,
         "/home/u/.local/state/token-broker"),
        ({"HOME": "/root"}, 0, "/var/lib/token-broker"),
        ({"HOME": "/root", "XDG_STATE_HOME": "/x/state"}, 0, "/x/state/token-broker"),
        ({"STATE_DIRECTORY": "/var/lib/token-broker", "XDG_STATE_HOME": "/x"}, 0,
         "/var/lib/token-broker"),
        ({"STATE_DIRECTORY": "/var/lib/tb:/var/lib/other"}, 1000, "/var/lib/tb"),
        ({"STATE_DIRECTORY": "/home/u/.local/state/tb", "HOME": "/home/u"}, 1000,
         "/home/u/.local/state/tb"),
    ],
)  # fmt: skip
def test_state_dir(env: dict[str, str], euid: int, expected: str) -> None:
    assert state_dir(env, euid=euid) == Path(expected)


def test_state_dir_reads_the_process_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert tls.TlsFiles.default().ca_cert == tmp_path / "token-broker" / "ca.crt"


# -- the local CA -----------------------------------------------------------------------


def test_init_creates_a_named_constrained_ca(tmp_path):
    files = tls.TlsFiles(tmp_path / "new" / "state")
    created, info = tls.init_ca(files, now=NOW, hostname="build-7")
    assert created and info.path == files.ca_cert
    cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    org = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    assert (cn, org) == ("token-broker local CA (build-7)", "token-broker")
    assert cert.issuer == cert.subject
    assert info.not_before == NOW - tls.BACKDATE
    assert info.not_after - NOW == pytest.approx(10 * 365.25 * DAY, abs=1)
    ext = cert.extensions
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    nc = ext.get_extension_for_class(x509.NameConstraints)
    assert nc.critical and nc.value.excluded_subtrees is None
    assert set(nc.value.permitted_subtrees) == {
        x509.IPAddress(ipaddress.ip_network("127.0.0.0/8")),
        x509.IPAddress(ipaddress.ip_network("::1/128")),
        x509.DNSName("localhost"),
    }
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    key = serialization.load_pem_private_key(files.ca_key.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (files.ca_key, files.ca_cert)}
    assert modes == {"ca.key": 0o600, "ca.crt": 0o644}
    assert stat.S_IMODE(files.directory.stat().st_mode) == 0o700
    assert {p.name for p in files.directory.iterdir()} == {"ca.key", "ca.crt", ".tls.lock"}


def test_init_leaves_an_existing_ca_alone(files):
    before = files.ca_cert.read_bytes(), files.ca_key.read_bytes()
    created, info = tls.init_ca(files)
    assert not created
    assert (files.ca_cert.read_bytes(), files.ca_key.read_bytes()) == before
    assert info.serial == x509.load_pem_x509_certificate(before[0]).serial_number


def test_init_refuses_a_ca_whose_key_is_missing_or_foreign(files, tmp_path):
    other = tls.TlsFiles(tmp_path / "other")
    tls.init_ca(other)
    files.ca_key.write_bytes(other.ca_key.read_bytes())
    with pytest.raises(TlsError, match=f"{files.ca_key} does not match {files.ca_cert}: remove"):
        tls.init_ca(files)
    files.ca_key.unlink()
    with pytest.raises(TlsError, match=f"the local CA key {files.ca_key} does not exist"):
        tls.init_ca(files)


def test_init_replaces_a_key_left_without_its_certificate(files):
    """A crash between the two writes leaves ca.key alone: no client can trust it yet."""
    files.ca_cert.unlink()
    old_key = files.ca_key.read_bytes()
    created, _ = tls.init_ca(files)
    assert created and files.ca_key.read_bytes() != old_key
    tls.issue_leaf(files)  # the new pair belongs together


def test_private_keys_have_mode_0600_from_their_first_byte(tmp_path, monkeypatch):
    """Every write into a key file happens on a file created O_EXCL with mode 0600,
    even under umask 0 (which would otherwise give 0666)."""
    opened: dict[int, tuple[str, int, int]] = {}
    written: list[tuple[str, int, int]] = []
    real_open, real_write = os.open, os.write

    def spy_open(path, flags, mode=0o777, *args, **kwargs):  # type: ignore[no-untyped-def]
        fd = real_open(path, flags, mode, *args, **kwargs)
        # The mode the file has the moment it exists, before anything else can happen.
        opened[fd] = (os.fspath(path), flags, stat.S_IMODE(os.fstat(fd).st_mode))
        return fd

    def spy_write(fd, data):  # type: ignore[no-untyped-def]
        path, flags, born = opened[fd]
        written.append((path, flags, born))
        if ".ca.key." in path or ".leaf.pem." in path:  # keys: no chmod before the write
            assert stat.S_IMODE(os.fstat(fd).st_mode) == born
        return real_write(fd, data)

    old_umask = os.umask(0)
    try:
        monkeypatch.setattr(os, "open", spy_open)
        monkeypatch.setattr(os, "write", spy_write)
        files = tls.TlsFiles(tmp_path / "state")
        tls.init_ca(files)
        tls.issue_leaf(files)
    finally:
        os.umask(old_umask)
        monkeypatch.undo()
    keys = [(p, f, m) for p, f, m in written if ".ca.key." in p or ".leaf.pem." in p]
    assert {Path(p).name.split(".")[1] for p, _, _ in keys} == {"ca", "leaf"}
    for path, flags, mode in keys:
        assert flags & os.O_EXCL and flags & os.O_CREAT, path
        assert mode == 0o600, (path, oct(mode))
    assert stat.S_IMODE(files.directory.stat().st_mode) == 0o700  # not 0777 under umask 0
    assert stat.S_IMODE(files.ca_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.leaf.stat().st_mode) == 0o600


def test_certificates_are_readable_by_others_under_umask_077(tmp_path):
    """systemd units run with UMask=0077; clients of other users must still read ca.crt."""
    old_umask = os.umask(0o077)
    try:
        files = tls.TlsFiles(tmp_path / "state")
        tls.init_ca(files)
        system = _write(tmp_path / "system.pem", files.ca_cert.read_bytes(), 0o644)
        tls.write_bundle(files, system)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(files.ca_cert.stat().st_mode) == 0o644
    assert stat.S_IMODE(files.bundle.stat().st_mode) == 0o644


def test_concurrent_inits_leave_one_consistent_ca(tmp_path):
    """The daemon and a user may run init at once; ca.key and ca.crt must still match."""
    state = tmp_path / "state"
    # Each process loads everything, then waits for the word go: all start init at once.
    code = (
        "import sys; from pathlib import Path; from broker import tls; "
        "import cryptography.x509, cryptography.hazmat.primitives.asymmetric.ec; "
        "sys.stdin.readline(); print(tls.init_ca(tls.TlsFiles(Path(sys.argv[1])))[0])"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(state)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        for _ in range(6)
    ]
    for p in procs:
        p.stdin.write(b"go\n")  # type: ignore[union-attr]
    for p in procs:
        p.stdin.flush()  # type: ignore[union-attr]
    outputs = [p.communicate(timeout=60)[0].decode().strip() for p in procs]
    assert sorted(outputs) == ["False"] * 5 + ["True"]
    tls.issue_leaf(tls.TlsFiles(state))  # raises if the key does not match the certificate


# -- name constraints and pathlen: a stolen CA key vouches for loopback only -----------

FOREIGN = [
    pytest.param({"ips": ("10.1.2.3",)}, "10.1.2.3", id="ip-10.1.2.3"),
    pytest.param({"dns": ("example.com",)}, "example.com", id="dns-example.com"),
    pytest.param({"cn": "example.com"}, "example.com", id="cn-only-example.com"),
    pytest.param({"dns": ("ims-na1.adobelogin.com",)}, "ims-na1.adobelogin.com", id="adobe-ims"),
]


@pytest.mark.parametrize(("names", "host"), FOREIGN)
def test_ssl_refuses_a_foreign_name_signed_with_the_ca_key(files, serve, names, host):
    ca_key, ca_cert = _stolen(files)
    key, leaf = _leaf(ca_key, ca_cert, **names)
    server = serve(key, leaf)
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        _handshake(_client(files.ca_cert), server.port, host)
    assert info.value.verify_message == "permitted subtree violation"
    # Control: the same key and subject without name constraints accepts this very leaf,
    # so the refusal above comes from the constraints and from nothing else.
    assert _handshake(_client(_ca(ca_key, ca_cert.subject, pathlen=0)), server.port, host)


@pytest.mark.parametrize(("names", "host"), FOREIGN[:2])
def test_httpx_and_requests_refuse_a_foreign_name_signed_with_the_ca_key(files, serve, names, host):
    ca_key, ca_cert = _stolen(files)
    server = serve(*_leaf(ca_key, ca_cert, **names))
    pinned = {"sni_hostname": host}  # verify against `host` while connecting to loopback
    with httpx.Client(verify=_client(files.ca_cert)) as client:
        with pytest.raises(httpx.ConnectError, match="permitted subtree violation"):
            client.get(server.url, extensions=pinned)
    with pytest.raises(requests.exceptions.SSLError, match="permitted subtree violation"):
        _requests_get(server.url, str(files.ca_cert), host)
    control = _ca(ca_key, ca_cert.subject, pathlen=0)
    with httpx.Client(verify=_client(control)) as client:
        assert client.get(server.url, extensions=pinned).text == "ok"
    bundle = _write(files.directory / "control.crt", _pem(control), 0o644)
    assert _requests_get(server.url, str(bundle), host).text == "ok"


def test_a_stolen_ca_key_cannot_make_an_intermediate(files, serve):
    """pathlen 0: a sub-CA minted with the stolen key is refused even for a loopback leaf."""
    ca_key, ca_cert = _stolen(files)
    sub_key, sub = _leaf(ca_key, ca_cert, cn="sub CA", dns=("localhost",), ca=True)
    key, leaf = _leaf(sub_key, sub, dns=("localhost",), ips=("127.0.0.1",))
    server = serve(key, leaf, sub)
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        _handshake(_client(files.ca_cert), server.port, "127.0.0.1")
    assert info.value.verify_message == "path length constraint exceeded"
    control = _ca(ca_key, ca_cert.subject, constraints=True, pathlen=None)
    assert _handshake(_client(control), server.port, "127.0.0.1")


# -- the leaf ---------------------------------------------------------------------------


def test_leaf_names_loopback_and_the_listen_hosts(files):
    info = tls.issue_leaf(files, ["127.0.0.2", "[::1]", "localhost", "127.0.0.1"], now=NOW)
    assert info.path == files.leaf
    assert info.dns_names == ("localhost",)
    assert info.ip_addresses == ("127.0.0.1", "::1", "127.0.0.2")
    assert info.not_before == NOW - tls.BACKDATE
    assert info.not_after == NOW + 7 * DAY
    pem = files.leaf.read_bytes()
    assert pem.index(b"PRIVATE KEY") < pem.index(b"CERTIFICATE")
    leaf = x509.load_pem_x509_certificate(pem[pem.index(b"-----BEGIN CERTIFICATE") :])
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    ext = leaf.extensions
    assert not ext.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ext.get_extension_for_class(x509.KeyUsage).value.digital_signature
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert leaf.issuer == ca.subject


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("10.1.2.3", "loopback names only .* not 10.1.2.3: set \\[server\\] tls_cert"),
        ("0.0.0.0", "not 0.0.0.0"),
        ("::ffff:127.0.0.1", "not ::ffff:127.0.0.1"),
        ("broker.internal", "'broker.internal' is not an IP address"),
    ],
)
def test_leaf_refuses_hosts_the_ca_cannot_vouch_for(files, host, message):
    with pytest.raises(TlsError, match=message):
        tls.issue_leaf(files, [host])
    assert not files.leaf.exists()


def test_the_leaf_verifies_with_every_loopback_name(files):
    tls.issue_leaf(files, ["127.0.0.2"])
    server = HttpsServer(tls.server_context(files.leaf))
    try:
        for name in ("127.0.0.1", "localhost"):
            assert _handshake(_client(files.ca_cert), server.port, name)
        with httpx.Client(verify=_client(files.ca_cert)) as client:
            assert client.get(server.url).text == "ok"
            assert client.get(server.url, extensions={"sni_hostname": "localhost"}).text == "ok"
        assert _requests_get(server.url, str(files.ca_cert)).text == "ok"
        with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
            _handshake(_client(files.ca_cert), server.port, "127.0.0.3")
    finally:
        server.close()
    server6 = HttpsServer(tls.server_context(files.leaf), host="::1")
    try:
        assert _handshake(_client(files.ca_cert), server6.port, "::1", host="::1")
    finally:
        server6.close()


def test_leaf_never_outlives_its_ca_and_an_expired_ca_issues_nothing(files):
    ca_end = tls.certs.validity(x509.load_pem_x509_certificate(files.ca_cert.read_bytes()))[1]
    info = tls.issue_leaf(files, now=ca_end - DAY)
    assert info.not_after == ca_end
    with pytest.raises(TlsError, match=f"the local CA {files.ca_cert} expired at"):
        tls.issue_leaf(files, now=ca_end + 1)


def test_renew_at_is_two_thirds_of_the_life_or_now():
    assert tls.renew_at(NOW, NOW + 3 * DAY, NOW) == NOW + 2 * DAY
    assert tls.renew_at(NOW, NOW + 3 * DAY, NOW + 2.5 * DAY) == NOW + 2.5 * DAY
    assert tls.renew_at(NOW, NOW + 30.0, NOW + 1) == NOW + 20.0  # a test's short leaf
    assert tls.renew_at(NOW, NOW + 3 * DAY, NOW + 9 * DAY) == NOW + 9 * DAY  # overdue


def test_a_short_lived_leaf_is_not_born_due(files):
    """The backdating is capped: a 3-second test leaf is renewed at 2/3 of its life."""
    info = tls.issue_leaf(files, now=NOW, lifetime=3.0)
    assert (info.not_before, info.not_after) == (NOW - 1, NOW + 3)  # 0.3 s, in whole seconds
    assert NOW + 1 < info.renew_at(NOW) < NOW + 2


def test_ensure_leaf_reuses_a_good_leaf_and_replaces_any_other(files, tmp_path):
    first = tls.ensure_leaf(files, ["127.0.0.2"], now=NOW)
    due = first.renew_at(NOW)
    assert tls.ensure_leaf(files, ["127.0.0.2"], now=due - 1).serial == first.serial
    assert tls.ensure_leaf(files, [], now=NOW).serial == first.serial  # covers more: fine
    renewed = tls.ensure_leaf(files, ["127.0.0.2"], now=due)
    assert renewed.serial != first.serial and renewed.not_before == due - tls.BACKDATE
    more = tls.ensure_leaf(files, ["127.0.0.2", "127.0.0.9"], now=due)
    assert more.serial != renewed.serial and "127.0.0.9" in more.ip_addresses
    shorter = tls.ensure_leaf(files, ["127.0.0.9"], now=due, lifetime=60)
    assert shorter.serial != more.serial and shorter.not_after == due + 60
    files.leaf.chmod(0o644)
    loose = tls.ensure_leaf(files, ["127.0.0.9"], now=due, lifetime=60)
    assert loose.serial != shorter.serial
    assert stat.S_IMODE(files.leaf.stat().st_mode) == 0o600
    # A new CA (same paths): the old leaf is not signed by it.
    for path in (files.ca_cert, files.ca_key):
        path.unlink()
    tls.init_ca(files)
    assert tls.ensure_leaf(files, ["127.0.0.9"], now=due, lifetime=60).serial != loose.serial


# -- server contexts: TLS 1.2+, renewal in place ----------------------------------------


def _serial(writer: asyncio.StreamWriter) -> int:
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


async def _renew_while_serving(files: tls.TlsFiles) -> None:
    first = tls.issue_leaf(files)
    ctx = tls.server_context(files.leaf)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            writer.write(line)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    client = _client(files.ca_cert)

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname="127.0.0.1"
        )

    async def echoes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        writer.write(b"ping\n")
        await writer.drain()
        return await reader.readline()

    async with server:
        old_reader, old_writer = await connect()
        assert _serial(old_writer) == first.serial
        assert await echoes(old_reader, old_writer) == b"ping\n"
        second = tls.issue_leaf(files)
        tls.reload_cert_chain(ctx, files.leaf)
        new_reader, new_writer = await connect()
        assert _serial(new_writer) == second.serial != first.serial
        assert await echoes(new_reader, new_writer) == b"ping\n"
        # The connection from before the renewal goes on, with its certificate.
        assert await echoes(old_reader, old_writer) == b"ping\n"
        assert _serial(old_writer) == first.serial
        for writer in (old_writer, new_writer):
            writer.close()
            await writer.wait_closed()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_renewal_in_place_new_connections_see_the_new_leaf(files, loop):
    factory = uvloop.new_event_loop if loop == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_renew_while_serving(files))


def test_a_failed_reload_keeps_serving_the_old_certificate(files, tmp_path):
    """Loading a mismatched pair half-way would leave the live context with no key."""
    first = tls.issue_leaf(files)
    ctx = tls.server_context(files.leaf)
    other = tls.TlsFiles(tmp_path / "other")
    tls.init_ca(other)
    tls.issue_leaf(other)
    # Another certificate with the key the context holds now: OpenSSL drops that key when
    # the certificate is loaded, then refuses the key file: cert and no key, if done live.
    cert = _write(
        tmp_path / "c.pem", other.leaf.read_bytes().split(b"-----END PRIVATE KEY-----")[1]
    )
    key = _write(tmp_path / "k.pem", files.leaf.read_bytes().split(b"-----BEGIN CERT")[0])
    with pytest.raises(TlsError, match="key values mismatch"):
        tls.reload_cert_chain(ctx, cert, key)
    server = HttpsServer(ctx)
    try:
        assert _handshake(_client(files.ca_cert), server.port, "127.0.0.1") == first.serial
    finally:
        server.close()


def test_server_context_speaks_tls_1_2_and_1_3_only(files):
    tls.issue_leaf(files)
    ctx = tls.server_context(files.leaf)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    server = HttpsServer(ctx)
    try:
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            client = _client(files.ca_cert)
            client.minimum_version = client.maximum_version = version
            with socket.create_connection(("127.0.0.1", server.port)) as raw:
                with client.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
                    assert conn.version() == version.name.replace("v1_", "v1.")
        old = _client(files.ca_cert)
        old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer TLS 1.1 at all
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # that is the point here
            old.minimum_version = ssl.TLSVersion.TLSv1
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION|UNSUPPORTED_PROTOCOL"):
                old.wrap_socket(raw, server_hostname="127.0.0.1")
    finally:
        server.close()


# -- user-provided tls_cert / tls_key ---------------------------------------------------


@pytest.fixture
def user_pair(tmp_path):
    """A cert-manager style RSA leaf + intermediate chain from another CA, and its key."""
    root_key = rsa.generate_private_key(65537, 2048)
    root = _ca(root_key, _name("cluster root"), pathlen=1)
    mid_key, mid = _leaf(root_key, root, cn="cluster issuer", ca=True)
    key, leaf = _leaf(mid_key, mid, dns=("localhost",), ips=("127.0.0.1", "10.1.2.3"),
                      key=rsa.generate_private_key(65537, 2048))  # fmt: skip
    cert_file = _write(tmp_path / "tls.crt", _pem(leaf, mid), 0o644)
    key_file = _write(tmp_path / "tls.key", _pem(key))
    return cert_file, key_file, root, (mid_key, mid)


def test_user_files_load_into_a_serving_context(user_pair):
    cert_file, key_file, root, _ = user_pair
    info = tls.load_cert_files(cert_file, key_file)
    assert info.ip_addresses == ("127.0.0.1", "10.1.2.3") and info.missing(["10.1.2.3"]) == []
    assert info.missing(["10.9.9.9", "0.0.0.0"]) == ["10.9.9.9"]
    server = HttpsServer(tls.server_context(cert_file, key_file))
    try:
        assert _handshake(_client(root), server.port, "127.0.0.1") == info.serial
    finally:
        server.close()


def test_user_file_errors_name_the_file(user_pair, tmp_path, monkeypatch):
    cert_file, key_file, _, (mid_key, mid) = user_pair
    missing = tmp_path / "nope.crt"
    with pytest.raises(TlsError, match=rf"^\[server\] tls_cert {missing} does not exist$"):
        tls.load_cert_files(missing, key_file)
    garbage = _write(tmp_path / "garbage.key", b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWJ5dGVz\n")
    with pytest.raises(TlsError, match=rf"tls_key {garbage} holds no readable PEM private key$"):
        tls.load_cert_files(cert_file, garbage)
    with pytest.raises(TlsError, match=rf"tls_cert {key_file} holds no readable PEM certificate"):
        tls.load_cert_files(key_file, key_file)
    other_key, _ = _leaf(mid_key, mid)
    wrong = _write(tmp_path / "wrong.key", _pem(other_key))
    with pytest.raises(TlsError, match=rf"tls_key {wrong} is not the key of \[server\] tls_cert"):
        tls.load_cert_files(cert_file, wrong)
    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    encrypted = _write(
        tmp_path / "enc.key",
        key.private_bytes(  # type: ignore[union-attr]
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        ),
    )
    with pytest.raises(TlsError, match=rf"tls_key {encrypted} is encrypted"):
        tls.load_cert_files(cert_file, encrypted)
    # The context itself must not prompt on the terminal for the password either.
    with pytest.raises(TlsError, match=rf"^{encrypted}: the private key is encrypted"):
        tls.server_context(cert_file, encrypted)
    real_read = Path.read_bytes

    def unreadable(self: Path) -> bytes:
        if self == key_file:  # root reads anything: make the kernel's answer explicit
            raise PermissionError(13, "Permission denied")
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", unreadable)
    with pytest.raises(TlsError, match=rf"tls_key {key_file} is not readable by this user"):
        tls.load_cert_files(cert_file, key_file)


def test_user_files_out_of_their_validity_are_refused(user_pair, tmp_path):
    cert_file, key_file, _, (mid_key, mid) = user_pair
    info = tls.load_cert_files(cert_file, key_file)
    with pytest.raises(TlsError, match=rf"tls_cert {cert_file} expired at"):
        tls.load_cert_files(cert_file, key_file, now=info.not_after)
    with pytest.raises(TlsError, match=rf"tls_cert {cert_file} is not valid before"):
        tls.load_cert_files(cert_file, key_file, now=info.not_before - 1)
    key, old = _leaf(mid_key, mid, not_before=time.time() - 9 * DAY, not_after=time.time() - DAY)
    expired = _write(tmp_path / "old.crt", _pem(old, mid))
    with pytest.raises(TlsError, match="expired at"):
        tls.load_cert_files(expired, _write(tmp_path / "old.key", _pem(key)))


def test_error_messages_never_quote_key_material(user_pair, tmp_path):
    cert_file, _, _, _ = user_pair
    secret = "c2VjcmV0LWtleS1tYXRlcmlhbA"
    bad = _write(tmp_path / "bad.key", f"-----BEGIN EC PRIVATE KEY-----\n{secret}\n".encode())
    for call in (
        lambda: tls.load_cert_files(cert_file, bad),
        lambda: tls.server_context(cert_file, bad),
    ):
        with pytest.raises(TlsError) as info:
            call()
        assert secret not in str(info.value) and secret not in repr(info.value)


# -- the trust bundle -------------------------------------------------------------------


@pytest.fixture
def adobe(tmp_path, serve):
    """A second TLS server whose certificate comes from another CA, standing in for Adobe,
    and a fake "system" bundle holding that CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    root = _ca(key, _name("Stand-in Public Root CA"))
    server = serve(*_leaf(key, root, dns=("localhost",), ips=("127.0.0.1",)))
    system = _write(tmp_path / "system-cas.pem", b"# the system's CAs\n" + _pem(root), 0o644)
    return server, system


def test_one_bundle_verifies_the_broker_and_adobe(files, adobe, monkeypatch):
    adobe_server, system = adobe
    tls.issue_leaf(files)
    broker = HttpsServer(tls.server_context(files.leaf))
    try:
        bundle = tls.write_bundle(files, system)
        assert bundle.path == files.bundle and bundle.changed and bundle.system == system
        assert stat.S_IMODE(bundle.path.stat().st_mode) == 0o644
        # What UST does: requests with REQUESTS_CA_BUNDLE in its environment.
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle.path))
        for url in (broker.url, adobe_server.url):
            assert requests.get(url, timeout=10).text == "ok"
        with httpx.Client(verify=_client(bundle.path)) as client:
            assert [client.get(u).text for u in (broker.url, adobe_server.url)] == ["ok", "ok"]
        # The trap the bundle avoids: REQUESTS_CA_BUNDLE replaces the trust store.
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(files.ca_cert))
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(adobe_server.url, timeout=10)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(system))
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(broker.url, timeout=10)
    finally:
        broker.close()


def test_the_bundle_is_rewritten_only_when_a_source_changes(files, adobe, tmp_path):
    _, system = adobe
    first = tls.write_bundle(files, system)
    mtime = first.path.stat().st_mtime_ns
    content = first.path.read_bytes()
    assert content.startswith(system.read_bytes().rstrip(b"\n"))
    assert content.endswith(files.ca_cert.read_bytes())
    again = tls.write_bundle(files, system)
    assert not again.changed and again.path.stat().st_mtime_ns == mtime
    system.write_bytes(system.read_bytes() + _pem(_ca(ec.generate_private_key(ec.SECP256R1()),
                                                      _name("New Root"))))  # fmt: skip
    assert tls.write_bundle(files, system).changed
    assert files.bundle.read_bytes().startswith(system.read_bytes().rstrip(b"\n"))
    for path in (files.ca_cert, files.ca_key):
        path.unlink()
    tls.init_ca(files)
    assert tls.write_bundle(files, system).changed
    assert files.bundle.read_bytes().endswith(files.ca_cert.read_bytes())
    empty = _write(tmp_path / "empty.pem", b"# nothing\n")
    with pytest.raises(TlsError, match=f"{empty} holds no PEM certificate"):
        tls.write_bundle(files, empty)


def test_system_bundle_is_certifis():
    import certifi

    assert tls.system_ca_bundle() == (
        Path(certifi.where()),
        "certifi's CA bundle (requests' default)",
    )


# -- doctor -----------------------------------------------------------------------------


def _verdicts(checks: list[Check]) -> list[bool | None]:
    return [c.ok for c in checks]


def test_doctor_all_good(files):
    tls.issue_leaf(files, ["127.0.0.2"])
    checks = tls.doctor(files, ["127.0.0.2", "::1"])
    assert _verdicts(checks) == [True, True, True, True], checks
    assert "mode 0600" in checks[0].text and "loopback names only" in checks[1].text


def test_doctor_without_a_ca_warns(tmp_path):
    (check,) = tls.doctor(tls.TlsFiles(tmp_path), ["127.0.0.1"])
    assert check.ok is None and "`token-broker tls init`" in check.text


def test_doctor_fails_a_key_others_can_read_or_another_user_owns(files, monkeypatch):
    tls.issue_leaf(files)
    files.ca_key.chmod(0o640)
    files.leaf.chmod(0o604)
    checks = tls.doctor(files)
    assert _verdicts(checks) == [False, True, False, True]
    assert f"run `chmod 600 {files.ca_key}`" in checks[0].text
    assert f"run `chmod 600 {files.leaf}`" in checks[2].text
    files.ca_key.chmod(0o600)
    files.leaf.chmod(0o600)
    monkeypatch.setattr(os, "getuid", lambda: 4242)
    checks = tls.doctor(files)
    assert _verdicts(checks) == [False, True, False, True]
    assert "not to this user (uid 4242)" in checks[0].text


def test_doctor_judges_the_ca_lifetime(files):
    tls.issue_leaf(files)
    end = tls.certs.validity(x509.load_pem_x509_certificate(files.ca_cert.read_bytes()))[1]
    assert tls.doctor(files, now=end - 400 * DAY)[1].ok is True
    soon = tls.doctor(files, now=end - 100 * DAY)[1]
    assert soon.ok is None and "plan a new CA" in soon.text
    assert tls.doctor(files, now=end)[1].ok is False


def test_doctor_judges_the_leaf(files, tmp_path):
    checks = tls.doctor(files)
    assert checks[-1].ok is None and "the daemon issues it" in checks[-1].text
    info = tls.issue_leaf(files, ["127.0.0.2"])
    expired = tls.doctor(files, now=info.not_after)[-1]
    assert expired.ok is False and "expired at" in expired.text
    uncovered = tls.doctor(files, ["127.0.0.2", "127.0.0.3"])[-1]
    assert uncovered.ok is False and uncovered.text.endswith("does not name 127.0.0.3")
    other = tls.TlsFiles(tmp_path / "other")
    tls.init_ca(other)
    tls.issue_leaf(other)
    files.leaf.write_bytes(other.leaf.read_bytes())
    foreign = tls.doctor(files)[-1]
    assert foreign.ok is False and "not signed by the local CA" in foreign.text


def test_doctor_fails_a_ca_without_name_constraints(files):
    ca_key, ca_cert = _stolen(files)
    files.ca_cert.write_bytes(_pem(_ca(ca_key, ca_cert.subject, pathlen=0)))
    check = tls.doctor(files)[1]
    assert check.ok is False and "no name constraints" in check.text


# -- cost: cryptography only when TLS is used -------------------------------------------


def test_importing_the_daemon_and_broker_tls_does_not_import_cryptography():
    code = (
        "import sys, broker.tls, broker.server, broker.cli; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'cryptography'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_works_where_memory_cannot_be_writable_and_executable(tmp_path):
    """The system unit sets MemoryDenyWriteExecute=yes; PR_SET_MDWE is the kernel's same rule.

    cffi callbacks (cryptography's older bindings) would need W+X memory: prove none is used.
    """
    code = f"""
import ctypes, mmap, sys
from pathlib import Path
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, REFUSE_EXEC_GAIN
    sys.exit(77)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    sys.exit("W+X memory was allowed: the rule is not in force")
except PermissionError:
    pass
from broker import tls
files = tls.TlsFiles(Path({str(tmp_path / "state")!r}))
tls.init_ca(files)
tls.issue_leaf(files)
tls.server_context(files.leaf)
assert [c.ok for c in tls.doctor(files)] == [True, True, True, True]
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
    assert (done.returncode, done.stdout) == (0, "ok\n"), done.stderr


# -- CLI --------------------------------------------------------------------------------


@pytest.fixture
def state(tmp_path, monkeypatch) -> tls.TlsFiles:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    return tls.TlsFiles(tmp_path / "xdg" / "token-broker")


def test_cli_tls_init_creates_once(state, capsys):
    assert main(["tls", "init"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"created a local CA: {state.ca_cert} (valid until ")
    assert f"private key {state.ca_key} (mode 0600)" in out
    before = state.ca_key.read_bytes()
    assert main(["tls", "init"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"a local CA exists already: {state.ca_cert}") and "left alone" in out
    assert state.ca_key.read_bytes() == before


def test_cli_tls_ca_prints_the_path_alone(state, capsys):
    assert main(["tls", "ca"]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"token-broker: the local CA certificate {state.ca_cert} does not exist: "
        "run `token-broker tls init`\n"
    )
    assert main(["tls", "init"]) == 0
    capsys.readouterr()
    assert main(["tls", "ca"]) == 0
    assert capsys.readouterr().out == f"{state.ca_cert}\n"


def test_cli_tls_ca_bundle(state, capsys, adobe, monkeypatch):
    _, system = adobe
    monkeypatch.setattr(tls.localca, "system_ca_bundle", lambda: (system, "the test's CA bundle"))
    assert main(["tls", "init"]) == 0
    capsys.readouterr()
    assert main(["tls", "ca", "--bundle"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{state.bundle}\n"
    assert captured.err == (
        f"token-broker: wrote {state.bundle}: the test's CA bundle ({system}) "
        f"+ the token-broker CA ({state.ca_cert})\n"
    )
    assert main(["tls", "ca", "--bundle"]) == 0
    assert capsys.readouterr().err.startswith(f"token-broker: {state.bundle} is up to date:")


def test_cli_tls_usage_errors_exit_2():
    for argv in (["tls"], ["tls", "frob"], ["tls", "ca", "--bundel"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2


# -- a state directory others could change; a planted CA (issue 18, items 4 and 5) -------


def _nobody() -> int:
    import pwd

    try:
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        return 65534


def test_a_planted_lock_symlink_is_not_followed(tmp_path):
    """`tls init` as root must not create (or truncate) what a planted .tls.lock names."""
    files = tls.TlsFiles(tmp_path / "state")
    files.directory.mkdir(mode=0o700)
    target = tmp_path / "etc-something"
    files.lock.symlink_to(target)
    with pytest.raises(TlsError, match=rf"{files.lock} is a symbolic link.*remove it"):
        tls.init_ca(files)
    assert not target.exists() and not files.ca_cert.exists()
    precious = _write(tmp_path / "precious", b"keep me\n", 0o644)
    files.lock.unlink()
    files.lock.symlink_to(precious)
    with pytest.raises(TlsError, match="symbolic link"):
        tls.init_ca(files)
    assert precious.read_bytes() == b"keep me\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make another user's directory")
def test_a_state_directory_another_user_made_is_refused(tmp_path):
    files = tls.TlsFiles(tmp_path / "state")
    files.directory.mkdir()
    os.chown(files.directory, _nobody(), -1)
    files.directory.chmod(0o777)
    with pytest.raises(TlsError) as info:
        tls.init_ca(files)
    text = str(info.value)
    assert f"{files.directory} is owned by uid {_nobody()}, not by this user" in text
    assert f"chown {os.geteuid()} {files.directory}" in text
    assert not files.ca_cert.exists() and not files.ca_key.exists()


def test_a_state_directory_others_may_write_is_refused(tmp_path):
    files = tls.TlsFiles(tmp_path / "state")
    files.directory.mkdir()
    files.directory.chmod(0o770)
    said = rf"{files.directory} is writable by group or others \(mode 0770\).*chmod go-w"
    with pytest.raises(TlsError, match=said):
        tls.init_ca(files)
    assert not files.ca_key.exists()
    # A directory above it that others may write (without the sticky bit of /tmp) too.
    files.directory.chmod(0o700)
    (tmp_path).chmod(0o777)
    try:
        with pytest.raises(TlsError, match=rf"{tmp_path} \(which holds {files.directory}\) is "
                                           "writable by group or others"):  # fmt: skip
            tls.init_ca(files)
        tmp_path.chmod(0o1777)  # sticky, as /tmp: nobody renames what is ours in it
        assert tls.init_ca(files)[0]
    finally:
        tmp_path.chmod(0o700)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make another user's file")
def test_a_ca_file_another_user_owns_or_may_write_is_refused(files):
    os.chown(files.ca_cert, _nobody(), -1)
    with pytest.raises(TlsError, match=rf"{files.ca_cert} is owned by uid {_nobody()}"):
        tls.init_ca(files)
    os.chown(files.ca_cert, os.geteuid(), -1)
    files.ca_cert.chmod(0o666)
    with pytest.raises(TlsError, match=rf"{files.ca_cert} is writable by group or others"):
        tls.issue_leaf(files)


def _plant_ca(files: tls.TlsFiles, permitted: list[x509.GeneralName] | None) -> tuple:
    """A CA planted where the broker keeps its own: no name constraints, or ``permitted``."""
    files.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name("token-broker local CA (planted)")
    now = time.time()
    builder = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(_when(now - DAY)).not_valid_after(_when(now + 365 * DAY))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_usage(cert_sign=True), critical=True)
    )  # fmt: skip
    if permitted is not None:
        builder = builder.add_extension(x509.NameConstraints(permitted, None), critical=True)
    cert = builder.sign(key, hashes.SHA256())
    _write(files.ca_key, _pem(key))
    _write(files.ca_cert, _pem(cert), 0o644)
    return key, cert


PLANTED = {
    "none": None,
    "adobe too": [x509.DNSName("localhost"), x509.DNSName("adobelogin.com")],
    "a LAN": [x509.IPAddress(ipaddress.ip_network("10.0.0.0/8"))],
}


@pytest.mark.parametrize("permitted", PLANTED.values(), ids=PLANTED.keys())
def test_a_planted_ca_without_the_loopback_constraints_is_refused(
    state, capsys, adobe, monkeypatch, permitted, serve
):
    """`tls init` left a planted CA alone, `tls ca --bundle` published it, and a certificate
    it signed for ims-na1.adobelogin.com then verified against the bundle."""
    adobe_server, system = adobe
    monkeypatch.setattr(tls.localca, "system_ca_bundle", lambda: (system, "the test's CA bundle"))
    key, cert = _plant_ca(state, permitted)
    fake = serve(*_leaf(key, cert, dns=("ims-na1.adobelogin.com",)))
    start_over = (f"remove {state.ca_cert}, {state.ca_key}, {state.leaf} and {state.bundle}, "
                  "run `token-broker tls init`")  # fmt: skip
    for argv in (["tls", "init"], ["tls", "ca"], ["tls", "ca", "--bundle"]):
        assert main(argv) == 1, argv
        captured = capsys.readouterr()
        assert captured.out == "", argv
        assert f"the local CA certificate {state.ca_cert} has " in captured.err
        assert "could vouch for any host" in captured.err and start_over in captured.err
    assert not state.bundle.exists() and not state.leaf.exists()
    # The daemon (`serve`) refuses it too: its certificate comes from ServerCertificate.
    with pytest.raises(TlsError, match="could vouch for any host"):
        tls.ServerCertificate(None, None, ["127.0.0.1"], files=state)
    with pytest.raises(TlsError, match="could vouch for any host"):
        tls.write_bundle(state, system)
    with pytest.raises(TlsError, match="could vouch for any host"):
        tls.issue_leaf(state)
    assert "could vouch" in tls.doctor(state)[1].text
    # The control: the bundle the old code wrote would have trusted the fake Adobe.
    control = _write(state.directory.parent / "control.pem", system.read_bytes() + _pem(cert))
    assert _handshake(_client(control), fake.port, "ims-na1.adobelogin.com")
    # After starting over as the sentence says, everything works again.
    for path in (state.ca_cert, state.ca_key):
        path.unlink()
    assert main(["tls", "init"]) == 0 and main(["tls", "ca", "--bundle"]) == 0
    capsys.readouterr()
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(_client(state.bundle), fake.port, "ims-na1.adobelogin.com")


def test_a_published_ca_is_checked_before_tls_ca_prints_it(tmp_path):
    files = tls.TlsFiles(tmp_path / "state")
    _plant_ca(files, None)
    with pytest.raises(TlsError, match=f"{files.ca_cert} has no name constraints"):
        tls.published_ca(files.ca_cert)
    tls_files = tls.TlsFiles(tmp_path / "good")
    tls.init_ca(tls_files)
    assert tls.published_ca(tls_files.ca_cert) == tls_files.ca_cert
    tls_files.ca_cert.chmod(0o666)
    with pytest.raises(TlsError, match="only its owner may change"):
        tls.published_ca(tls_files.ca_cert)


def test_the_ca_is_published_only_into_a_directory_only_we_may_change(files, tmp_path, adobe,
                                                                      monkeypatch):  # fmt: skip
    _, system = adobe
    monkeypatch.setattr(tls.localca, "system_ca_bundle", lambda: (system, "the test's CA bundle"))
    cert = tls.ServerCertificate(None, None, ["127.0.0.1"], files=files)
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o711)
    cert.publish(runtime)
    assert (runtime / "ca.crt").read_bytes() == files.ca_cert.read_bytes()
    assert stat.S_IMODE((runtime / "ca-bundle.crt").stat().st_mode) == 0o644
    runtime.chmod(0o777)
    with pytest.raises(TlsError, match=f"{runtime} is writable by group or others"):
        cert.publish(runtime)
    runtime.chmod(0o711)
    (runtime / "ca.crt").unlink()
    (runtime / "ca.crt").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(TlsError, match="symbolic link"):
        cert.publish(runtime)
    assert not (tmp_path / "elsewhere").exists()
