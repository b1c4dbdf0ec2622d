"""The broker as a process (``token-broker serve``) against a real issuer on loopback."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from helpers import (
    HEADERS,
    BrokerProcess,
    IssuerThread,
    config_file,
    reserve_port,
    wait_for,
    write_config,
)

from broker.cli import main


def status(url: str, name: str = "main") -> dict:  # type: ignore[type-arg]
    return httpx.get(f"{url}/v1/credentials/{name}", headers=HEADERS).json()


def test_adobe_token_is_the_issued_one_and_the_request_is_ims_shaped(issuer, start_broker):
    b = start_broker()
    r = httpx.get(b.url + "/token", headers=HEADERS)
    assert r.status_code == 200
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["content-type"].startswith("text/plain")
    assert r.text in issuer.issuer.issued
    assert issuer.issuer.calls == 1

    seen = issuer.issuer.received[0]
    assert seen.path == "/ims/token/v3"
    assert seen.headers["content-type"] == "application/x-www-form-urlencoded"
    assert seen.form == {
        "grant_type": "client_credentials",
        "client_id": "broker-client",
        "client_secret": b.secret,
        "scope": "openid,AdobeID",
    }

    body = httpx.get(b.url + "/v1/credentials/main/token", headers=HEADERS)
    assert body.headers["cache-control"] == "no-store"
    data = body.json()
    assert data["access_token"] == r.text and data["token_type"] == "bearer"
    assert 3590 <= data["expires_in"] <= 3600 and isinstance(data["expires_in"], int)
    assert data["expires_at"].endswith("Z")

    headers = httpx.get(b.url + "/v1/credentials/main/headers", headers=HEADERS).json()
    assert headers == {
        "Authorization": f"Bearer {r.text}",
        "x-api-key": "broker-client",
        "x-gw-ims-org-id": "ABC@AdobeOrg",
    }
    st = status(b.url)
    assert st["state"] == "fresh" and st["provider"] == "adobe" and st["last_error"] is None
    assert httpx.get(b.url + "/readyz").status_code == 200


def test_oauth2_basic_auth_form_encodes_id_and_secret(issuer, start_broker):
    # The issuer decodes Basic credentials per RFC 6749 §2.3.1; the secret has '+', '/', ' ', ':'.
    b = start_broker('params = { audience = "https://api.example.com" }', provider="oauth2")
    r = httpx.get(b.url + "/token", headers=HEADERS)
    assert r.status_code == 200 and r.text in issuer.issuer.issued
    seen = issuer.issuer.received[0]
    assert seen.path == "/oauth2/token"
    assert seen.headers["authorization"].startswith("Basic ")
    assert "client_secret" not in seen.form
    assert seen.form == {
        "grant_type": "client_credentials",
        "scope": "openid AdobeID",
        "audience": "https://api.example.com",
    }


def test_oauth2_client_secret_post(issuer, start_broker):
    b = start_broker('auth_method = "client_secret_post"', provider="oauth2")
    assert httpx.get(b.url + "/token", headers=HEADERS).status_code == 200
    seen = issuer.issuer.received[0]
    assert "authorization" not in seen.headers
    assert seen.form["client_secret"] == b.secret and seen.form["client_id"] == "broker-client"


def test_300_concurrent_cold_requests_cause_one_issuer_call(issuer, start_broker):
    issuer.issuer.delay = 3  # the eager fetch is still in flight when the crowd arrives
    b = start_broker()

    async def crowd() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=300)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            return await asyncio.gather(
                *(client.get(b.url + "/token", headers=HEADERS) for _ in range(300))
            )

    assert not issuer.issuer.issued, "not a cold start: the token was issued already"
    responses = asyncio.run(crowd())
    assert {r.status_code for r in responses} == {200}
    assert len({r.text for r in responses}) == 1
    assert issuer.issuer.calls == 1


def test_short_lived_token_is_replaced_before_it_expires(issuer, start_broker):
    issuer.issuer.lifetime = 15
    b = start_broker()
    tokens: list[str] = []
    with httpx.Client(base_url=b.url, headers=HEADERS) as client:

        def replaced() -> bool:
            r = client.get("/token")
            received = time.time()
            assert r.status_code == 200, r.text
            # Never an expired token: the issuer's own record of its expiry is later.
            assert issuer.issuer.issued[r.text] > received
            if not tokens or tokens[-1] != r.text:
                tokens.append(r.text)
            return len(tokens) >= 2

        # Served until the refresh at ~0.67 × 15 s replaces it (not a fixed time).
        wait_for(replaced, timeout=30, what="the token to be refreshed")
    # Refreshes happen ahead of expiry, not as a hot loop: the next one is planned for
    # ~0.67 of the new token's life (the broker's own schedule, in whole seconds).
    st = status(b.url)
    refreshed, planned, expires = (
        datetime.fromisoformat(st[key]).timestamp()
        for key in ("refreshed_at", "next_refresh_at", "expires_at")
    )
    assert refreshed + 0.5 * 15 - 1 <= planned < expires
    assert issuer.issuer.calls <= 5


def test_outage_serves_cached_token_until_min_remaining_then_503(issuer, start_broker):
    issuer.issuer.lifetime = 8
    b = start_broker(refresh='retry_initial = "0.5s"\nretry_max = "1s"\nmin_remaining = "2s"')
    first = httpx.get(b.url + "/token", headers=HEADERS).text
    expires_at = issuer.issuer.issued[first]
    # min_remaining is min(2 s, 10% of 8 s) = 0.8 s before expiry. The broker counts the
    # token's life from before it asked, so its own limit is no later than this one.
    serve_until = expires_at - 0.8
    issuer.issuer.mode = "error500"
    while True:
        sent = time.time()
        r = httpx.get(b.url + "/token", headers=HEADERS)
        if r.status_code != 200:
            break
        assert r.text == first
        # The broker decided after the request was sent: a request sent after the limit
        # must not get the token, however late a loaded machine lets the test send it.
        assert sent < serve_until, "the cached token was served past min_remaining"
        time.sleep(0.05)
    # ...and it was not given up early (the answer came after the limit, or close to it).
    assert time.time() >= serve_until - 0.5
    assert r.status_code == 503
    assert int(r.headers["retry-after"]) >= 1
    body = r.json()
    assert body["error"] == "token_unavailable"
    assert body["last_error"]["status"] == 500
    assert body["last_error"]["error"] == "internal_error"
    assert body["last_error"]["x_debug_id"]
    assert httpx.get(b.url + "/readyz").status_code == 503
    assert status(b.url)["state"] in ("expired", "refreshing")
    calls_during_outage = issuer.issuer.calls
    assert calls_during_outage <= 12, "retries are not backing off"

    issuer.issuer.mode = "ok"  # heals by itself, without any request forcing it
    wait_for(lambda: httpx.get(b.url + "/readyz").status_code == 200, timeout=5)
    r = httpx.get(b.url + "/token", headers=HEADERS)
    assert r.status_code == 200 and r.text != first


def test_invalid_client_is_not_retried_in_a_loop(issuer, start_broker):
    b = start_broker(register=False)  # the issuer does not know this secret
    wait_for(lambda: status(b.url)["state"] == "failed")
    for _ in range(50):
        r = httpx.get(b.url + "/token", headers=HEADERS)
        assert r.status_code == 503 and r.json()["error"] == "token_unavailable"
    assert issuer.issuer.calls == 1
    st = status(b.url)  # no retry is scheduled at all (rather than waiting to see none come)
    assert st["last_error"]["error"] == "invalid_client"
    assert st["last_error"]["description"] == "invalid client parameter"
    assert st["next_refresh_at"] is None

    forced = httpx.post(b.url + "/v1/credentials/main/refresh", headers=HEADERS)
    assert forced.status_code == 502
    assert forced.json()["error"] == "issuer_error"
    assert "invalid_client" in forced.json()["detail"]
    assert "x-debug-id" in forced.json()["detail"]
    assert issuer.issuer.calls == 2
    again = httpx.post(b.url + "/v1/credentials/main/refresh", headers=HEADERS)
    assert again.status_code == 429 and again.json()["error"] == "refresh_cooldown"
    assert int(again.headers["retry-after"]) >= 1
    assert issuer.issuer.calls == 2


def test_forced_refresh_replaces_the_token(issuer, start_broker):
    b = start_broker(refresh='force_cooldown = "0s"')
    first = httpx.get(b.url + "/token", headers=HEADERS).text
    r = httpx.post(b.url + "/v1/credentials/main/refresh", headers=HEADERS)
    assert r.status_code == 200 and r.json()["state"] == "fresh"
    second = httpx.get(b.url + "/token", headers=HEADERS).text
    assert second != first and second in issuer.issuer.issued


@pytest.mark.parametrize("mode", ["garbage", "html502", "no_token", "throttle", "hang"])
def test_bad_answers_do_not_hurt_the_daemon(issuer, start_broker, mode):
    issuer.issuer.mode = mode
    issuer.issuer.retry_after = 1
    b = start_broker(refresh='timeout = "1s"\nretry_initial = "0.2s"\nretry_max = "0.5s"')
    expected = {
        "garbage": "invalid_response",
        "html502": "http_error",
        "no_token": "invalid_response",
        "throttle": "too_many_requests",
        "hang": "timeout",
    }[mode]
    wait_for(lambda: (status(b.url)["last_error"] or {}).get("error") == expected, timeout=8)
    for _ in range(5):
        started = time.monotonic()
        assert httpx.get(b.url + "/healthz").status_code == 200
        assert time.monotonic() - started < 0.5, "healthz blocked by the issuer"
    assert httpx.get(b.url + "/token", headers=HEADERS).status_code == 503
    issuer.issuer.mode = "ok"
    wait_for(lambda: httpx.get(b.url + "/token", headers=HEADERS).status_code == 200, timeout=8)
    assert b.proc.proc.poll() is None


def test_retry_after_is_honoured(issuer, start_broker):
    issuer.issuer.mode = "throttle"
    issuer.issuer.retry_after = 3
    b = start_broker(refresh='retry_initial = "0.1s"\nretry_max = "0.2s"')
    wait_for(lambda: issuer.issuer.calls >= 1)
    forced = httpx.post(b.url + "/v1/credentials/main/refresh", headers=HEADERS)
    assert forced.status_code == 429 and forced.json()["error"] == "refresh_cooldown"
    wait_for(lambda: issuer.issuer.calls >= 2, timeout=8)
    first, second = issuer.issuer.received[:2]
    assert second.at - first.at >= 3 - 0.05, "retried before the issuer's Retry-After"


def test_a_broken_secret_fails_one_credential_only(issuer, start_broker, tmp_path):
    extra = f"""
[credentials.broken]
provider = "oauth2"
client_id = "other"
token_url = "{issuer.url}/oauth2/token"
secret = "file:{tmp_path}/does-not-exist"
"""
    b = start_broker(extra=extra, server='default = "main"')
    assert httpx.get(b.url + "/token", headers=HEADERS).status_code == 200
    assert httpx.get(b.url + "/token/main", headers=HEADERS).status_code == 200
    r = httpx.get(b.url + "/token/broken", headers=HEADERS)
    assert r.status_code == 503
    st = status(b.url, "broken")
    assert st["state"] == "failed"
    assert st["last_error"]["error"] == "secret_unavailable"
    assert "does-not-exist" in st["last_error"]["description"]
    assert "does not exist" in st["last_error"]["description"]
    ready = httpx.get(b.url + "/readyz")
    assert ready.status_code == 503
    assert ready.json()["credentials"] == {"main": "fresh", "broken": "failed"}
    assert "broken" in b.proc.output()
    unknown = httpx.get(b.url + "/token/nope", headers=HEADERS)
    assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_credential"


FORBIDDEN = {
    "no header": {},
    "empty header": {"X-Token-Broker": ""},
    "host rebinding": {**HEADERS, "Host": "evil.example.com"},
    "host wrong port": {**HEADERS, "Host": "localhost:1"},
    "host other loopback": {**HEADERS, "Host": "127.0.0.2"},
    "origin": {**HEADERS, "Origin": "http://localhost"},
    "sec-fetch-site": {**HEADERS, "Sec-Fetch-Site": "cross-site"},
    "x-forwarded-for": {**HEADERS, "X-Forwarded-For": "127.0.0.1"},
    "forwarded": {**HEADERS, "Forwarded": "for=127.0.0.1"},
}
GUARDED = [
    "/token",
    "/token/main",
    "/v1/credentials",
    "/v1/credentials/main/token",
    "/v1/credentials/main/headers",
]


def test_guards_refuse_every_case_on_every_guarded_route(start_broker):
    b = start_broker()
    wrong = []
    with httpx.Client(base_url=b.url) as client:
        for case, headers in FORBIDDEN.items():
            for path in GUARDED:
                r = client.get(path, headers=headers)
                if r.status_code != 403 or r.json()["error"] != "forbidden":
                    wrong.append((case, path, r.status_code))
            r = client.post("/v1/credentials/main/refresh", headers=headers)
            if r.status_code != 403:
                wrong.append((case, "refresh", r.status_code))
    assert wrong == []


def test_guards_apply_to_open_routes_and_accept_loopback_hosts(start_broker):
    b = start_broker()
    assert httpx.get(b.url + "/healthz", headers={"Origin": "http://x"}).status_code == 403
    assert httpx.get(b.url + "/metrics", headers={"Host": "evil.example"}).status_code == 403
    for host in (
        "localhost",
        f"localhost:{b.port}",
        "127.0.0.1",
        f"127.0.0.1:{b.port}",
        "[::1]",
        f"[::1]:{b.port}",
        "LOCALHOST",
    ):
        r = httpx.get(b.url + "/token", headers={**HEADERS, "Host": host})
        assert r.status_code == 200, host
    assert httpx.get(b.url + "/token", headers={**HEADERS, "Sec-Fetch-Site": "none"}).is_success
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(b.url + path, headers=HEADERS).status_code == 404


def test_require_header_can_be_turned_off(start_broker):
    b = start_broker(server='require_header = ""')
    assert httpx.get(b.url + "/token").status_code == 200
    assert httpx.get(b.url + "/token", headers={"Origin": "http://x"}).status_code == 403


def test_unix_socket_listener_mode_group_and_no_host_check(issuer, tmp_path):
    secret = tmp_path / "s"
    secret.write_text("unix-secret")
    issuer.issuer.add_client("c", "unix-secret")
    sock = tmp_path / "broker.sock"
    import grp

    group = grp.getgrgid(os.getgid() if os.getgid() != 0 else 1).gr_name
    config = config_file(
        tmp_path / "c.toml",
        {"u": {"provider": "oauth2", "client_id": "c", "secret": f"file:{secret}",
               "token_url": f"{issuer.url}/oauth2/token"}},
        server={"listen": [f"unix:{sock}"], "socket_mode": "0600", "socket_group": group},
    )  # fmt: skip
    proc = BrokerProcess(config)
    try:
        proc.wait_healthy("http://localhost", uds=str(sock))
        st = os.stat(sock)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_gid == grp.getgrnam(group).gr_gid
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))) as client:
            r = client.get("http://anything.example/token", headers=HEADERS)
            assert r.status_code == 200 and r.text in issuer.issuer.issued
            assert client.get("http://localhost/token").status_code == 403  # header still needed
            r = client.get("http://localhost/token", headers={**HEADERS, "Origin": "http://x"})
            assert r.status_code == 403
        assert main(["token", "--config", str(config)]) == 0
    finally:
        proc.stop()


def test_cli_token_and_list_ask_the_running_daemon(issuer, start_broker, capsys):
    b = start_broker()
    config = str(b.proc.config)
    assert main(["token", "--config", config]) == 0
    token = capsys.readouterr().out.strip()
    assert token in issuer.issuer.issued
    assert main(["token", "main", "--config", config]) == 0
    assert capsys.readouterr().out.strip() == token
    assert main(["list", "--config", config]) == 0
    out = capsys.readouterr().out
    assert "main" in out and "fresh" in out and "EXPIRES_AT" in out
    assert token not in out
    assert main(["token", "nope", "--config", config]) == 1
    assert "unknown_credential" in capsys.readouterr().err


def test_cli_reports_a_daemon_that_is_not_running(tmp_path, capsys):
    nobody = f"127.0.0.1:{reserve_port()}"  # reserved: nobody listens there
    config = config_file(tmp_path / "c.toml", server={"listen": [nobody]})
    assert main(["token", "--config", str(config)]) == 1
    assert "cannot reach the token broker at http://127.0.0.1:" in capsys.readouterr().err


def serve_and_fail(config: Path) -> subprocess.CompletedProcess[str]:
    """`token-broker serve` with a config it must refuse at start."""
    return subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_non_loopback_listen_is_refused_at_start(tmp_path):
    config = config_file(tmp_path / "c.toml", server={"listen": ["0.0.0.0:8765"]})
    r = serve_and_fail(config)
    assert r.returncode == 1
    assert "loopback is required" in r.stderr
    assert str(config) in r.stderr


def test_malformed_config_names_file_and_key(tmp_path: Path):
    config = write_config(
        tmp_path / "c.toml",
        '[credentials.a]\nprovider = "adobe"\nclient_id = "x"\nscopes = "openid"\n',
    )
    r = serve_and_fail(config)
    assert r.returncode == 1
    assert f"{config}: [credentials.a] scopes: expected a valid list" in r.stderr
    assert "Traceback" not in r.stderr


def test_sigterm_stops_the_daemon_promptly(start_broker):
    b = start_broker()
    started = time.monotonic()
    assert b.proc.stop() == 0
    assert time.monotonic() - started < 3


def test_unused_issuer_thread_helper_is_real(issuer: IssuerThread):
    # The fixture serves real HTTP: a bad secret is refused with the IMS error shape.
    r = httpx.post(issuer.url + "/ims/token/v3", data={"client_id": "x", "client_secret": "y"})
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_client"
    assert r.headers["x-debug-id"]
