"""The IMS-compatible HTTPS endpoint against the broker as a process (DESIGN §10).

Adobe's umapi-client (in an environment of its own, as the User Sync Tool has
it) posts to the broker as if it were IMS, with a broker client key as its
client_secret and REQUESTS_CA_BUNDLE naming the broker's bundle; the other
cases speak to the endpoint with httpx over TLS.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from helpers import HEADERS, Repeated, config_file, reserve_port, wait_for
from standin import StandInApi
from ust import Umapi

from broker.access import new_key

ORG = "ABC@AdobeOrg"


@dataclass
class Ims:
    broker: object  # the start_broker Running
    port: int
    url: str
    key: str
    state: Path  # XDG_STATE_HOME of the broker: its local CA lives there
    env: dict[str, str]

    def ca(self, *args: str) -> str:
        """`token-broker tls ca [--bundle]` as the broker's user: the path it prints."""
        done = subprocess.run(
            [sys.executable, "-m", "broker", "tls", "ca", *args],
            capture_output=True, text=True, env=self.env, check=True, timeout=60,
        )  # fmt: skip
        return done.stdout.strip()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=ssl.create_default_context(cafile=self.ca()))

    def form(self, **fields: str) -> dict[str, str]:
        return {
            "grant_type": "client_credentials",
            "client_id": "broker-client",
            "client_secret": self.key,
            "scope": "openid,AdobeID,user_management_sdk",
            **fields,
        }


def start_ims(start_broker, tmp_path: Path, *, extra_server: str = "", **kw) -> Ims:  # type: ignore[no-untyped-def]
    import os

    key = new_key()
    digest = hashlib.sha256(key.encode()).hexdigest()
    port = reserve_port()
    state = tmp_path / "state"
    env = {**os.environ, "XDG_STATE_HOME": str(state)}
    broker = start_broker(
        server=f'ims_listen = ["127.0.0.1:{port}"]\n{extra_server}',
        scopes=("openid", "AdobeID", "user_management_sdk"),
        extra=f'[clients.ust]\nkey_sha256 = "{digest}"\ncredentials = ["main"]\n',
        env={"XDG_STATE_HOME": str(state)},
        **kw,
    )
    if kw.get("wait", True):  # the first token is in: issuer calls counted from here
        wait_for(lambda: httpx.get(broker.url + "/readyz").status_code == 200, what="ready")
    return Ims(broker, port, f"https://127.0.0.1:{port}", key, state, env)


@pytest.fixture
def ims(start_broker, tmp_path) -> Ims:
    return start_ims(start_broker, tmp_path)


@pytest.fixture
def api(issuer) -> Iterator[StandInApi]:
    stand_in = StandInApi(lambda: issuer.issuer.issued, "broker-client", ORG).start()
    yield stand_in
    stand_in.stop()


def test_umapi_clients_own_oauth_s2s_gets_the_brokers_token(ims, api, issuer):
    """The User Sync Tool's way in: OAuthS2S(client_id, <client key>, auth_host=broker)."""
    bundle = ims.ca("--bundle")
    calls = issuer.issuer.calls
    with Umapi(env={"REQUESTS_CA_BUNDLE": bundle}) as umapi:
        umapi.result("connect", org=ORG, endpoint=api.endpoint, auth="s2s",
                     client_id="broker-client", client_secret=ims.key,
                     auth_host=f"127.0.0.1:{ims.port}")  # fmt: skip
        assert umapi.result("users") == ["ada@example.com"]
        assert umapi.result("user", email="bob@example.com") == "bob@example.com"
    served = httpx.get(
        ims.broker.url + "/token",  # type: ignore[attr-defined]
        headers={**HEADERS, "Authorization": f"Bearer {ims.key}"},
    ).text
    assert api.accepted() and set(api.accepted()) == {served}  # the broker's cached token
    assert issuer.issuer.calls == calls  # answered from the cache


def test_a_wrong_key_fails_with_umapi_clients_own_error(ims, api):
    bundle = ims.ca("--bundle")
    for secret in ("tbk_not-a-key", ims.broker.secret):  # type: ignore[attr-defined]
        with Umapi(env={"REQUESTS_CA_BUNDLE": bundle}) as umapi:
            umapi.result("connect", org=ORG, endpoint=api.endpoint, auth="s2s",
                         client_id="broker-client", client_secret=secret,
                         auth_host=f"127.0.0.1:{ims.port}")  # fmt: skip
            answer = umapi.call("users")
        assert answer["ok"] is False and answer["error"] == "RuntimeError", answer
        assert "Response Code: 401" in answer["message"] and "invalid_client" in answer["message"]
        assert secret not in answer["message"]
    # The Adobe secret presented as a client key is refused like any wrong key, unlogged.
    assert ims.broker.secret not in ims.broker.proc.output()  # type: ignore[attr-defined]


def test_without_the_brokers_ca_the_handshake_fails(ims, api):
    with Umapi() as umapi:  # requests' own trust store: certifi's
        umapi.result("connect", org=ORG, endpoint=api.endpoint, auth="s2s",
                     client_id="broker-client", client_secret=ims.key,
                     auth_host=f"127.0.0.1:{ims.port}")  # fmt: skip
        answer = umapi.call("auth_token")  # the handshake itself, without umapi's retries
    assert answer["ok"] is False and answer["error"] == "SSLError", answer
    assert "CERTIFICATE_VERIFY_FAILED" in answer["message"]


@pytest.mark.parametrize("path", ["/ims/token/v2", "/ims/token/v2/", "/ims/token/v3",
                                  "/ims/token/v3/"])  # fmt: skip
def test_both_versions_with_and_without_the_slash(ims, path):
    with ims.client() as c:
        r = c.post(path, data=ims.form())
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"access_token", "token_type", "expires_in"}
    assert body["token_type"] == "bearer" and 3590 <= body["expires_in"] <= 3600
    assert r.headers["cache-control"] == "no-store"


def test_errors_in_ims_shape(ims):
    with ims.client() as c:
        cases = [
            (c.post("/ims/token/v3", data=ims.form(client_secret="tbk_wrong")), 401,
             "invalid_client"),
            (c.post("/ims/token/v3", data=ims.form(client_id="nobody")), 401, "invalid_client"),
            (c.post("/ims/token/v3", data={k: v for k, v in ims.form().items()
                                           if k != "client_secret"}), 401, "invalid_client"),
            (c.post("/ims/token/v3", data=ims.form(grant_type="password")), 400,
             "unsupported_grant_type"),
            (c.post("/ims/token/v3", data=ims.form(scope="openid,read_organizations,x")), 400,
             "invalid_scope"),
            (c.post("/ims/token/v3", content=b"client_id=a&client_id=b",
                    headers={"content-type": "application/x-www-form-urlencoded"}), 400,
             "invalid_request"),
            (c.post("/ims/token/v3", json=ims.form()), 400, "invalid_request"),
        ]  # fmt: skip
        for r, status, error in cases:
            assert r.status_code == status, r.text
            assert set(r.json()) == {"error", "error_description"} and r.json()["error"] == error
        scope = c.post("/ims/token/v3", data=ims.form(scope="openid,read_organizations,x"))
        assert scope.json()["error_description"].endswith("read_organizations, x")
        for path in ("/token", "/v1/credentials", "/healthz", "/metrics", "/ims/token/v1"):
            assert c.get(path, headers=HEADERS).status_code == 404  # nothing else here
            assert c.post(path, headers=HEADERS, data=ims.form()).status_code == 404


def test_guards_apply_but_not_the_x_token_broker_header(ims):
    with ims.client() as c:
        ok = c.post("/ims/token/v3", data=ims.form(), headers={"Host": f"127.0.0.1:{ims.port}"})
        assert ok.status_code == 200
        for headers, status in (
            ({"Host": "evil.example"}, 403),
            ({"Origin": "https://evil.example"}, 403),
            ({"Sec-Fetch-Site": "cross-site"}, 403),
            ({"X-Forwarded-For": "10.0.0.1"}, 403),
        ):
            r = c.post("/ims/token/v3", data=ims.form(), headers=headers)
            assert r.status_code == status, (headers, r.text)


def test_no_servable_token_is_503_temporarily_unavailable(start_broker, issuer, tmp_path):
    issuer.issuer.mode = "error500"
    ims = start_ims(start_broker, tmp_path, wait=False)
    ims.broker.proc.wait_healthy(ims.broker.url)  # type: ignore[attr-defined]
    wait_for(lambda: (ims.state / "token-broker" / "leaf.pem").exists(), what="the leaf")
    with ims.client() as c:
        r = c.post("/ims/token/v3", data=ims.form())
    assert r.status_code == 503 and r.json()["error"] == "temporarily_unavailable"
    assert int(r.headers["retry-after"]) >= 1


def test_a_thousand_requests_from_fifty_fresh_tls_connections_cost_no_issuer_call(ims, issuer):
    calls = issuer.issuer.calls
    context = ssl.create_default_context(cafile=ims.ca())
    failures: list[str] = []

    def connection() -> None:
        with httpx.Client(base_url=ims.url, verify=context) as c:  # a new TLS connection
            for _ in range(20):
                r = c.post("/ims/token/v3", data=ims.form())
                if r.status_code != 200:
                    failures.append(r.text)

    threads = [threading.Thread(target=connection) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert issuer.issuer.calls == calls


def serial_of(port: int, cafile: str) -> int:
    context = ssl.create_default_context(cafile=cafile)
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
    from cryptography import x509

    return x509.load_der_x509_certificate(der).serial_number  # type: ignore[arg-type]


def test_the_leaf_is_renewed_without_a_restart_and_serving_goes_on(start_broker, tmp_path):
    ims = start_ims(start_broker, tmp_path, extra_server='tls_leaf_lifetime = "9s"')
    cafile = ims.ca()
    first = serial_of(ims.port, cafile)

    def ask(client: httpx.Client) -> str | None:
        r = client.post("/ims/token/v3", data=ims.form())
        return None if r.status_code == 200 else r.text

    with ims.client() as c, Repeated(lambda: ask(c)) as load:
        second = wait_for(
            lambda: (s := serial_of(ims.port, cafile)) != first and s, timeout=20,
            what="a new leaf (renewed at 2/3 of 9 s)",
        )  # fmt: skip
    assert second != first and load.failures == [] and load.served > 10
    assert "new leaf certificate" in ims.broker.proc.output()  # type: ignore[attr-defined]


# -- the User Sync Tool section of docs/ims-endpoint.md, followed as written ----------------


def _tls_stand_in(issuer, directory: Path):  # type: ignore[no-untyped-def]
    """Adobe's User Management API behind a TLS-inspecting proxy: the stand-in, over HTTPS
    with a certificate from a "corporate" CA that only $REQUESTS_CA_BUNDLE trusts."""
    from doctext import CLIENT_ID, ORG
    from helpers import make_ca_and_leaf

    corporate, leaf, key = make_ca_and_leaf(directory, "corporate")
    stand_in = StandInApi(lambda: issuer.issuer.issued, CLIENT_ID, ORG)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(leaf, key)
    stand_in.server.socket = context.wrap_socket(stand_in.server.socket, server_side=True)
    return stand_in.start(), corporate


def test_the_user_sync_tool_section_followed_as_written(issuer, tmp_path):
    """docs/ims-endpoint.md, step by step, as a user on the UST host: the client key
    (0600) before ims_listen, the restart, the connector-umapi.yml snippet read the way
    UST 2.10 reads it and used with umapi-client, a corporate CA bundle kept, and the
    troubleshooting curl telling the failures apart.

    Only what cannot be the same here is changed: /etc/user-sync is a temporary
    directory, port 8443 a free port, the key placeholder the key, `systemctl restart`
    a restart of the broker process, and UST's API host the stand-in's.
    """
    import os
    import stat
    import tomllib

    import tomlkit
    import yaml
    from doctext import CLIENT_ID, ORG, block, project_json, user_env
    from helpers import BrokerProcess, new_secret

    from broker.config import TcpListen

    home = tmp_path / "home"
    home.mkdir()
    env = user_env(home)
    ust_dir = tmp_path / "user-sync"
    port, ims_port = reserve_port(), reserve_port()
    secret = new_secret()
    issuer.issuer.add_client(CLIENT_ID, secret)
    project = project_json(home / "project.json", secret)
    cfg = home / ".config" / "token-broker" / "config.toml"
    cfg.parent.mkdir(parents=True)
    config_file(cfg, server={"listen": [f"127.0.0.1:{port}"]})

    def sh(text: str, **extra: str) -> subprocess.CompletedProcess[str]:
        text = text.replace("/etc/user-sync", str(ust_dir)).replace("8443", str(ims_port))
        return subprocess.run(["bash", "-e", "-c", text], capture_output=True, text=True,
                              env={**env, **extra}, cwd=home, timeout=120)  # fmt: skip

    # The credential UST uses, named adobe, served by a running broker.
    done = sh(f"token-broker import {project} --name adobe --keep --ims-url {issuer.url} "
              f"--secret file:{home}/adobe.secret")  # fmt: skip
    assert done.returncode == 0, done.stderr
    proc = BrokerProcess(cfg, env={"XDG_STATE_HOME": env["XDG_STATE_HOME"]})
    try:
        proc.wait_healthy(f"http://127.0.0.1:{port}")
        # 1. The client key, written 0600 before ims_listen exists (the config takes it).
        done = sh(block("ust-key"))
        assert done.returncode == 0, done.stderr
        key_file = ust_dir / "broker.key"
        key = key_file.read_text().strip()
        assert key.startswith("tbk_") and stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert "this is the first client key" in done.stderr  # (d): every reader needs one
        # 2. ims_listen into [server], then the restart and the bundle.
        doc = tomlkit.parse(cfg.read_text())
        wanted = tomllib.loads(block("ust-config").replace("8443", str(ims_port)))
        doc["server"]["ims_listen"] = wanted["server"]["ims_listen"]  # type: ignore[index]
        cfg.write_text(tomlkit.dumps(doc))
        restart = block("ust-restart").splitlines()
        assert restart[0] == "systemctl restart token-broker"
        proc.stop()
        proc = BrokerProcess(cfg, env={"XDG_STATE_HOME": env["XDG_STATE_HOME"]})
        proc.wait_healthy(f"http://127.0.0.1:{port}")
        assert TcpListen("127.0.0.1", ims_port)  # the listener the config now names
        done = sh(restart[1])
        assert done.returncode == 0, done.stderr
        assert Path(done.stdout.strip()).is_file()  # the bundle's path, alone on stdout
        wait_for(lambda: (Path(env["XDG_STATE_HOME"]) / "token-broker" / "leaf.pem").exists(),
                 what="the leaf of the HTTPS listener")  # fmt: skip

        # 3-4. A host whose REQUESTS_CA_BUNDLE names a corporate CA: appended, not replaced.
        api, corporate = _tls_stand_in(issuer, tmp_path)
        try:
            done = sh(block("ust-append-ca") + 'echo "$REQUESTS_CA_BUNDLE"\n',
                      REQUESTS_CA_BUNDLE=str(corporate))  # fmt: skip
            assert done.returncode == 0, done.stderr
            bundle = done.stdout.strip()
            assert bundle == str(ust_dir / "ca-bundle.crt")
            connector = yaml.safe_load(
                block("ust-connector").replace("8443", str(ims_port)).replace("tbk_…", key)
            )
            assert connector["enterprise"] == {"org_id": ORG, "client_id": CLIENT_ID,
                                               "client_secret": key}  # fmt: skip
            connector["server"]["host"] = f"127.0.0.1:{api.port}"  # the stand-in for Adobe
            calls = issuer.issuer.calls
            with Umapi(env={"REQUESTS_CA_BUNDLE": bundle}) as umapi:
                umapi.result("ust_connect", connector=connector)
                assert umapi.result("users") == ["ada@example.com"]
            assert api.accepted() and issuer.issuer.calls == calls  # the broker's cached token
            # (b) Without `authentication_method: oauth`, UST stops as the docs say.
            jwt = {k: v for k, v in connector.items() if k != "authentication_method"}
            with Umapi(env={"REQUESTS_CA_BUNDLE": bundle}) as umapi:
                answer = umapi.call("ust_connect", connector=jwt)
            assert "'tech_acct_id' is required for jwt authentication" in answer["message"]
            # (e) `tls ca --bundle` alone (certifi + the broker) would lose the corporate CA.
            alone = ssl.create_default_context(cafile=sh(restart[1]).stdout.strip())
            with pytest.raises(ssl.SSLCertVerificationError):
                with socket.create_connection(("127.0.0.1", api.port), timeout=10) as raw:
                    alone.wrap_socket(raw, server_hostname="127.0.0.1").close()
        finally:
            api.stop()

        # (f) The troubleshooting curl: 200, then each failure it tells apart.
        curl = block("ust-curl")
        done = sh(curl, REQUESTS_CA_BUNDLE=bundle)
        assert (done.returncode, done.stdout.strip()) == (0, "200"), done.stderr
        untrusted = sh(curl, REQUESTS_CA_BUNDLE=str(corporate))
        assert untrusted.returncode == 60 and "SSL certificate problem" in untrusted.stderr
        assert key not in untrusted.stderr + untrusted.stdout
    finally:
        proc.stop()
    down = sh(curl, REQUESTS_CA_BUNDLE=bundle)
    assert down.returncode == 7 and "Failed to connect" in down.stderr
    assert key not in proc.output() and secret not in proc.output()
    assert os.environ.get("REQUESTS_CA_BUNDLE") != bundle  # nothing leaked into the tests


def test_a_key_removed_by_a_reload_is_refused_to_a_request_sent_before_it(start_broker, tmp_path):
    """The head of a request (and so the request) arrived before the reload that removed
    its key; its form with the key arrives after. It was answered 200 under the old
    settings for up to header_timeout: now the key is judged when the answer is made."""
    import os
    import signal
    from urllib.parse import urlencode

    from rawhttp import RawRequest

    ims = start_ims(start_broker, tmp_path, extra_server='header_timeout = "60s"')
    context = ssl.create_default_context(cafile=ims.ca())
    body = urlencode(ims.form()).encode()
    head = (f"POST /ims/token/v3 HTTP/1.1\r\nHost: 127.0.0.1:{ims.port}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")  # fmt: skip
    waiting = RawRequest(ims.port, head, context=context)
    with ims.client() as c:  # after it on the same event loop: the head above is in
        assert c.post("/ims/token/v3", data=ims.form()).status_code == 200
    # `token-broker client add ust --replace`: the old key goes, by a reload.
    config = ims.broker.proc.config  # type: ignore[attr-defined]
    new_key_ = new_key()
    digest = hashlib.sha256(ims.key.encode()).hexdigest()
    new_digest = hashlib.sha256(new_key_.encode()).hexdigest()
    config.write_text(config.read_text().replace(digest, new_digest))
    os.kill(ims.broker.proc.proc.pid, signal.SIGHUP)  # type: ignore[attr-defined]
    main = ims.broker.url + "/token"  # type: ignore[attr-defined]
    wait_for(lambda: httpx.get(main, headers={**HEADERS, "Authorization": f"Bearer {ims.key}"})
             .status_code == 401, what="the reload")  # fmt: skip
    waiting.send(body)
    status, _, answer = waiting.answer()
    assert (status, answer.get("error")) == (401, "invalid_client"), (status, list(answer))
    assert "access_token" not in answer
    with ims.client() as c:
        assert c.post("/ims/token/v3", data=ims.form(client_secret=new_key_)).status_code == 200


def test_serve_refuses_a_planted_ca_without_the_loopback_constraints(tmp_path):
    """A CA planted where the broker keeps its own, with no name constraints: `serve` used
    it for ims_listen (and published it); now it stops with how to start over."""
    import datetime
    import os

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    state = tmp_path / "state" / "token-broker"
    state.mkdir(parents=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "token-broker local CA")])
    now = datetime.datetime.now(datetime.timezone.utc)  # noqa: UP017 - as helpers.py
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    (state / "ca.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))  # fmt: skip
    (state / "ca.key").chmod(0o600)
    (state / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    digest = hashlib.sha256(new_key().encode()).hexdigest()
    config = config_file(
        tmp_path / "config.toml",
        {"main": {"provider": "adobe", "client_id": "broker-client", "secret": "env:TB_SECRET"}},
        server={
            "listen": [f"127.0.0.1:{reserve_port()}"],
            "ims_listen": [f"127.0.0.1:{reserve_port()}"],
        },
        clients={"ust": {"key_sha256": digest, "credentials": ["main"]}},
    )
    done = subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--config", str(config)],
        env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "TB_SECRET": "x" * 20},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert f"the local CA certificate {state / 'ca.crt'} has no name constraints" in done.stderr
    assert f"remove {state / 'ca.crt'}, {state / 'ca.key'}" in done.stderr
    assert not (state / "leaf.pem").exists() and not (state / "ca-bundle.crt").exists()


def _handshake(port: int, context: ssl.SSLContext) -> None:
    """One TLS handshake with the broker that must fail on the client's side too."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            context.wrap_socket(raw, server_hostname="127.0.0.1")


def test_failed_handshakes_are_logged_and_counted_by_reason(ims, api):
    """A User Sync Tool without the broker's CA leaves a trace: an info line with the peer
    and the reason, and a count by reason; so do a TLS 1.1 client and one with no cipher
    in common with the broker (whose key is EC: RSA-only suites cannot be served)."""
    import re
    import warnings

    with Umapi() as umapi:  # requests' own trust store: the broker's CA is not in it
        umapi.result("connect", org=ORG, endpoint=api.endpoint, auth="s2s",
                     client_id="broker-client", client_secret=ims.key,
                     auth_host=f"127.0.0.1:{ims.port}")  # fmt: skip
        assert umapi.call("auth_token")["error"] == "SSLError"
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1: that is the point
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    _handshake(ims.port, old)
    rsa = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    rsa.check_hostname, rsa.verify_mode = False, ssl.CERT_NONE
    rsa.maximum_version = ssl.TLSVersion.TLSv1_2
    rsa.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256:AES128-SHA")
    _handshake(ims.port, rsa)
    out = ims.broker.proc.output  # type: ignore[attr-defined]
    for reason in ("unknown_ca", "protocol_version", "no_shared_cipher"):
        line = wait_for(
            lambda r=reason: re.search(
                rf"INFO broker\.connections: TLS handshake from 127\.0\.0\.1:\d+ on "
                rf"127\.0\.0\.1:{ims.port} failed: {r}: .*", out()),
            what=f"the {reason} line",
        )  # fmt: skip
        if reason == "unknown_ca":
            assert "token-broker tls ca --bundle" in line.group(0)
    metrics = httpx.get(ims.broker.url + "/metrics").text  # type: ignore[attr-defined]
    for reason in ("unknown_ca", "protocol_version", "no_shared_cipher"):
        series = (
            f'token_broker_tls_handshake_failures_total{{listener="127.0.0.1:{ims.port}",'
            f'reason="{reason}"}} '
        )
        assert series in metrics, metrics
    # And the listener goes on serving a client that trusts the CA.
    with ims.client() as c:
        assert c.post("/ims/token/v3", data=ims.form()).status_code == 200


def _raw(sock: socket.socket, request: bytes) -> bytes:
    """Send ``request``; the broker's whole first answer (or what came within 5 s)."""
    import re

    sock.settimeout(5)
    sock.sendall(request)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length: (\d+)", head)
            if sep and length and len(body) >= int(length.group(1)):
                break  # a whole answer, kept alive or not
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def test_http_1_1_framing_and_host_rules_on_both_listeners(ims):
    """RFC 9112 §6.3 and §3.2, RFC 9110 §4.2.4, over raw sockets: a Transfer-Encoding that
    does not end in chunked, an absolute-form target with userinfo, without Host or with
    a malformed Host: 400 and closed, on the main listener and the IMS one alike."""
    main = ims.broker.port  # type: ignore[attr-defined]
    auth = f"X-Token-Broker: 1\r\nAuthorization: Bearer {ims.key}\r\n".encode()
    form = "&".join(f"{k}={v}" for k, v in ims.form().items()).encode()
    body = (b"Content-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: %d\r\n" % len(form))  # fmt: skip
    tricks = [  # (target, header lines)
        (b"/T", b"Host: localhost\r\nTransfer-Encoding: identity\r\n"),
        (b"http://user@localhost:P/T", b"Host: localhost\r\n"),
        (b"http://localhost:P/T", b""),
        (b"http://localhost:P/T", b"Host: user@localhost\r\n"),
    ]
    context = ssl.create_default_context(cafile=ims.ca())
    bearer = {**HEADERS, "Authorization": f"Bearer {ims.key}"}
    token = httpx.get(ims.broker.url + "/token", headers=bearer).text.encode()  # type: ignore[attr-defined]

    def connect(port: int) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if port == main:
            return sock
        return context.wrap_socket(sock, server_hostname="127.0.0.1")

    for port, method, path, extra, tail in (
        (main, b"GET", b"/token", auth, b""),
        (ims.port, b"POST", b"/ims/token/v3", body, form),
    ):
        ok = b"http://localhost:%d%s" % (port, path)
        with connect(port) as sock:  # the same target, well formed: served
            answer = _raw(sock, method + b" " + ok + b" HTTP/1.1\r\nHost: localhost\r\n" + extra
                          + b"\r\n" + tail)  # fmt: skip
        assert answer.startswith(b"HTTP/1.1 200 ") and token in answer, answer[:300]
        for target, lines in tricks:
            target = target.replace(b"P", b"%d" % port).replace(b"/T", path)
            with connect(port) as sock:
                answer = _raw(sock, method + b" " + target + b" HTTP/1.1\r\n" + lines + extra
                              + b"\r\n" + tail)  # fmt: skip
            assert answer.startswith(b"HTTP/1.1 400 "), (port, target, lines, answer[:300])
            assert b"connection: close" in answer.lower(), answer[:300]
            assert token not in answer
