"""broker.client against the broker as a process, the loopback issuer and a stand-in API.

The API clients are the real ones: Adobe's umapi-client (the library of the
User Sync Tool), requests, httpx.Client and httpx.AsyncClient, each with
``auth=BrokerAuth("main")``. The stand-in API answers 401 to a token the test
revoked; the next call must still succeed, with a new token and exactly one
more token request at the issuer.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import requests
from helpers import HEADERS, ServerThread, reserve_port
from standin import StandInApi
from ust import Umapi

from broker.access import key_digest, new_key
from broker.client import (
    AsyncTokenBroker,
    BrokerAuth,
    BrokerRefused,
    BrokerUnavailable,
    TokenBroker,
)

ORG = "ABC@AdobeOrg"  # what start_broker configures
ROOT = Path(__file__).resolve().parents[2]
REFRESH = "/v1/credentials/main/refresh"


@pytest.fixture
def api(issuer) -> Iterator[StandInApi]:
    stand_in = StandInApi(lambda: issuer.issuer.issued, "broker-client", ORG).start()
    yield stand_in
    stand_in.stop()


@pytest.fixture
def broker(start_broker):
    """A broker whose forced refreshes are not rate-limited (each test revokes more than once)
    and whose access log shows every request, so the tests can count forced refreshes."""
    return start_broker(refresh='force_cooldown = "0s"', server="access_log = true")


@pytest.fixture
def tb(broker) -> Iterator[TokenBroker]:
    """A TokenBroker for ``broker``, its connection pool closed at the end."""
    with TokenBroker(broker.url) as client:
        yield client


def forced(running) -> int:
    """POST /v1/credentials/main/refresh requests the broker has answered."""
    return running.proc.output().count(f"POST {REFRESH} ")


def current(running) -> str:
    return httpx.get(running.url + "/token/main", headers=HEADERS).text


def test_umapi_client_calls_through_broker_auth(broker, api, issuer):
    """Adobe's umapi-client, in an environment of its own with token-broker beside it."""
    with Umapi() as umapi:
        umapi.result("connect", org=ORG, endpoint=api.endpoint, auth="broker",
                     broker=broker.url, name="main")  # fmt: skip
        assert umapi.result("users") == ["ada@example.com"]
        first = api.accepted()[-1]
        assert first == current(broker)
        calls = issuer.issuer.calls

        api.revoke(first)  # the API stops accepting the token the broker serves
        assert umapi.result("user", email="bob@example.com") == "bob@example.com"
        assert issuer.issuer.calls == calls + 1
        second = api.accepted()[-1]
        assert second != first and second == current(broker)

        # A POST with a JSON body: the 401 is answered by sending the same body again.
        api.revoke(second)
        done = umapi.result("add_to_group", email="bob@example.com", group="Designers")
        assert done == [0, 1, 1]
        assert issuer.issuer.calls == calls + 2
        posts = [s for s in api.seen if s.method == "POST"]
        assert [s.status for s in posts] == [401, 200]
        assert posts[0].body == posts[1].body and b"Designers" in posts[1].body
        assert api.refused() == [first, second]
        assert forced(broker) == 2


def test_requests_with_broker_auth(broker, tb, api, issuer):
    auth = BrokerAuth("main", broker=tb)
    with requests.Session() as session:
        r = session.get(f"{api.endpoint}/users/{ORG}/0", auth=auth)
        assert r.status_code == 200 and r.json()["result"] == "success"
        calls = issuer.issuer.calls
        api.revoke(api.accepted()[-1])
        r = session.post(f"{api.endpoint}/action/{ORG}", data=b'[{"do": []}]', auth=auth)
        assert r.status_code == 200, r.text
        assert [h.status_code for h in r.history] == [401]
        assert issuer.issuer.calls == calls + 1
        # A body requests streams (a generator) cannot be sent twice: the 401 comes back.
        api.revoke(api.accepted()[-1])
        r = session.post(f"{api.endpoint}/action/{ORG}", data=iter([b'[{"do": []}]']), auth=auth)
        assert r.status_code == 401
        assert issuer.issuer.calls == calls + 1


def test_httpx_client_with_broker_auth(broker, tb, api, issuer):
    auth = BrokerAuth("main", broker=tb)
    with httpx.Client(auth=auth) as client:
        assert client.get(f"{api.endpoint}/users/{ORG}/0").status_code == 200
        calls = issuer.issuer.calls
        api.revoke(api.accepted()[-1])
        r = client.get(f"{api.endpoint}/organizations/{ORG}/users/ada@example.com")
        assert r.status_code == 200 and r.json()["user"]["email"] == "ada@example.com"
        assert issuer.issuer.calls == calls + 1
        assert api.accepted()[-1] == current(broker)


def test_httpx_async_client_with_broker_auth(broker, tb, api, issuer):
    auth = BrokerAuth("main", broker=tb)

    async def calls() -> tuple[int, int]:
        async with httpx.AsyncClient(auth=auth) as client:
            first = await client.get(f"{api.endpoint}/users/{ORG}/0")
            before = issuer.issuer.calls
            api.revoke(api.accepted()[-1])
            second = await client.post(f"{api.endpoint}/action/{ORG}", json=[{"do": []}])
            assert issuer.issuer.calls == before + 1
            return first.status_code, second.status_code

    assert asyncio.run(calls()) == (200, 200)
    assert api.refused() and api.accepted()[-1] == current(broker)


def test_fifty_threads_with_a_401_cause_one_forced_refresh(broker, tb, api, issuer):
    auth = BrokerAuth("main", broker=tb)
    n = 50
    url = f"{api.endpoint}/users/{ORG}/0"
    with httpx.Client(auth=auth, limits=httpx.Limits(max_connections=n)) as client:
        assert client.get(url).status_code == 200  # warm: every thread holds the same headers
        calls = issuer.issuer.calls
        api.revoke(api.accepted()[-1])
        api.barrier = threading.Barrier(n)  # all 50 hold their 401 at the same moment
        statuses: list[int] = []
        threads = [
            threading.Thread(target=lambda: statuses.append(client.get(url).status_code))
            for _ in range(n)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert statuses == [200] * n
    assert len(api.refused()) == n
    assert issuer.issuer.calls == calls + 1
    assert forced(broker) == 1


# -- redirects: the token stays with its origin -------------------------------------------


class Site:
    """A loopback HTTP server whose answers the test decides; it records every request.

    ``answer(path, authorization)`` returns (status, extra headers).
    """

    def __init__(
        self, host: str, answer: Callable[[str, str | None], tuple[int, dict[str, str]]]
    ) -> None:
        self.seen: list[tuple[str, str | None]] = []  # (path, Authorization) per request
        site = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                authorization = self.headers.get("Authorization")
                site.seen.append((self.path, authorization))
                status, headers = answer(self.path, authorization)
                self.send_response(status)
                for name, value in {**headers, "Content-Length": "0"}.items():
                    self.send_header(name, value)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer((host, 0), Handler)
        server.daemon_threads = True
        self.url = f"http://{host}:{server.server_address[1]}"
        self._serving = ServerThread(server).start()

    def stop(self) -> None:
        self._serving.stop()


@pytest.fixture
def sites() -> Iterator[Callable[..., Site]]:
    started: list[Site] = []

    def start(host: str, answer: Callable[[str, str | None], tuple[int, dict[str, str]]]) -> Site:
        started.append(Site(host, answer))
        return started[-1]

    yield start
    for site in started:
        site.stop()


def get_with(kind: str, url: str, auth: BrokerAuth) -> int:
    """GET ``url`` with ``auth``, following redirects, with requests or httpx (sync, async)."""
    if kind == "requests":
        with requests.Session() as session:
            return session.get(url, auth=auth).status_code
    if kind == "httpx":
        with httpx.Client(auth=auth, follow_redirects=True) as client:
            return client.get(url).status_code

    async def get() -> int:
        async with httpx.AsyncClient(auth=auth, follow_redirects=True) as client:
            return (await client.get(url)).status_code

    return asyncio.run(get())


CLIENTS = ("requests", "httpx", "httpx-async")


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize("host", ["127.0.0.2", "127.0.0.1"], ids=["other-host", "other-port"])
def test_a_401_from_another_origin_after_a_redirect_never_gets_a_token(
    broker, tb, issuer, sites, kind, host
):
    """The API redirects to another origin, which answers 401: that origin never receives a
    token (requests strips it on the hop, and BrokerAuth must not add a fresh one), and a
    401 from an origin that never saw the token refreshes nothing."""
    other = sites(host, lambda path, auth: (401, {"WWW-Authenticate": "Bearer"}))
    api = sites("127.0.0.1", lambda path, auth: (302, {"Location": other.url + "/landing"}))
    token = current(broker)  # the broker's first token is in: count issuer calls from here
    calls = issuer.issuer.calls
    assert get_with(kind, api.url + "/start", BrokerAuth("main", broker=tb)) == 401
    assert other.seen and all(auth is None for _, auth in other.seen), other.seen
    assert api.seen == [("/start", f"Bearer {token}")]  # once, and only the origin
    assert other.seen == [("/landing", None)]
    assert issuer.issuer.calls == calls and forced(broker) == 0


def test_a_401_from_the_origin_after_a_redirect_is_still_retried_there(broker, tb, issuer, sites):
    """requests: a redirect within the origin keeps the token; a 401 there is retried, to it."""
    refused: set[str] = set()

    def answer(path: str, auth: str | None) -> tuple[int, dict[str, str]]:
        if path == "/start":
            return 302, {"Location": "/next"}
        token = (auth or "")[len("Bearer ") :]
        return (200 if token in issuer.issuer.issued and token not in refused else 401), {}

    api = sites("127.0.0.1", answer)
    auth = BrokerAuth("main", broker=tb)
    first = current(broker)
    refused.add(first)  # the API stops accepting it
    with requests.Session() as session:
        assert session.get(api.url + "/start", auth=auth).status_code == 200
    second = current(broker)
    assert second != first and forced(broker) == 1
    assert api.seen == [
        ("/start", f"Bearer {first}"),
        ("/next", f"Bearer {first}"),
        ("/next", f"Bearer {second}"),
    ]


# -- errors -----------------------------------------------------------------------------


def no_secret(exc: BaseException, *secrets: str) -> None:
    for text in (str(exc), repr(exc)):
        for secret in secrets:
            assert secret not in text


def test_broker_down_is_unavailable_naming_the_url():
    url = f"http://127.0.0.1:{reserve_port()}"
    with pytest.raises(BrokerUnavailable) as info, TokenBroker(url) as client:
        client.token()
    assert url in str(info.value) and info.value.retry_after is None


def test_no_servable_token_is_unavailable_with_retry_after(start_broker, issuer):
    b = start_broker(register=False)  # the issuer does not know this secret: no token ever
    with pytest.raises(BrokerUnavailable) as info, TokenBroker(b.url) as client:
        client.token("main")
    assert info.value.status == 503 and info.value.code == "token_unavailable"
    assert info.value.retry_after is not None and info.value.retry_after >= 1


def test_refusals_carry_the_brokers_code_and_never_the_key(start_broker, issuer, tmp_path):
    key, other = new_key(), new_key()
    clients = (
        f'[clients.reader]\nkey_sha256 = "{key_digest(key).hex()}"\ncredentials = ["main"]\n'
        f'[clients.nothing]\nkey_sha256 = "{key_digest(other).hex()}"\n'
        'credentials = ["elsewhere"]\n'
        # a second credential for the key above; its token does not matter here
        '[credentials.elsewhere]\nprovider = "oauth2"\nclient_id = "x"\n'
        'token_url = "http://127.0.0.1:9/oauth2/token"\nsecret = "env:TB_TEST_UNSET"\n'
    )
    b = start_broker(extra=clients)
    token = current_with(b, key)
    cases = [
        (None, "main", 401, "unauthorized"),
        ("tbk_wrong", "main", 401, "unauthorized"),
        (other, "main", 403, "forbidden"),
        (key, "nope", 403, "forbidden"),  # names cannot be probed
    ]
    for client_key, name, status, code in cases:
        with pytest.raises(BrokerRefused) as info, TokenBroker(b.url, key=client_key) as client:
            client.headers(name)
        assert (info.value.status, info.value.code) == (status, code), info.value
        no_secret(info.value, key, other, token)
    # Without client keys an unknown name is a 404.
    plain = start_broker()
    with pytest.raises(BrokerRefused) as info, TokenBroker(plain.url) as client:
        client.status("nope")
    assert (info.value.status, info.value.code) == (404, "unknown_credential")


def test_the_key_file_is_read_per_request(start_broker, issuer, tmp_path, monkeypatch):
    first, second = new_key(), new_key()
    b = start_broker(
        extra=f'[clients.a]\nkey_sha256 = "{key_digest(first).hex()}"\ncredentials = ["*"]\n'
        f'[clients.b]\nkey_sha256 = "{key_digest(second).hex()}"\ncredentials = ["*"]\n'
    )
    key_file = tmp_path / "client.key"
    key_file.write_text(first + "\n")
    monkeypatch.setenv("TOKEN_BROKER_CLIENT_KEY_FILE", str(key_file))
    monkeypatch.delenv("TOKEN_BROKER_CLIENT_KEY", raising=False)
    client = TokenBroker(b.url)
    assert client.status()["name"] == "main"
    key_file.write_text("tbk_revoked-or-mistyped\n")
    with pytest.raises(BrokerRefused):
        client.token()
    key_file.write_text(second + "\n")  # rotated: the same object uses it at once
    assert client.token() == current_with(b, second)
    client.close()


def current_with(running, key: str) -> str:
    headers = {**HEADERS, "Authorization": f"Bearer {key}"}
    return httpx.get(running.url + "/token/main", headers=headers).text


def test_the_broker_tells_the_default_and_the_token_life(broker, issuer):
    rows = httpx.get(broker.url + "/v1/credentials", headers=HEADERS).json()
    assert [(r["name"], r["default"]) for r in rows] == [("main", True)]
    r = httpx.get(broker.url + "/v1/credentials/main/headers", headers=HEADERS)
    assert set(r.json()) == {"Authorization", "x-api-key", "x-gw-ims-org-id"}
    assert 3500 < int(r.headers["X-Token-Expires-In"]) <= 3600


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short path for a unix socket (pytest's tmp paths can pass the 108-byte limit)."""
    path = Path(tempfile.mkdtemp(prefix="tb-client-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_every_method_over_a_unix_socket(start_broker, issuer, short_dir):
    sock = short_dir / "client.sock"
    b = start_broker(listen=(f"unix:{sock}",))
    client = TokenBroker(f"unix:{sock}")
    token = client.token()
    assert token == client.token("main") == current(b)
    assert client.headers()["x-gw-ims-org-id"] == ORG
    assert client.status()["state"] == "fresh"
    client.refresh()
    assert client.token() != token

    async def via_async() -> str:
        async with AsyncTokenBroker(f"unix:{sock}") as a:
            return await a.token()

    assert asyncio.run(via_async()) == client.token()
    client.close()


# -- the import promise -----------------------------------------------------------------

BLOCKED_IMPORTS = textwrap.dedent(
    """
    import json, sys

    BLOCKED = {"fastapi", "uvicorn", "starlette", "pydantic", "pydantic_core", "keyring",
               "apscheduler", "tomlkit"}

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked in this test: {name}")
            return None

    sys.meta_path.insert(0, Block())
    try:
        import fastapi  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker does not block")

    import httpx
    from broker.client import BrokerAuth, TokenBroker

    broker_url, api_url = sys.argv[1], sys.argv[2]
    client = TokenBroker(broker_url)
    before = client.token()
    headers = client.headers()
    status = client.status("main")
    client.refresh()
    after = client.token("main")
    with httpx.Client(auth=BrokerAuth(broker=client)) as api:
        code = api.get(api_url).status_code
    loaded = sorted({m.split(".")[0] for m in sys.modules} & BLOCKED)
    print(json.dumps({"changed": before != after, "headers": sorted(headers),
                      "state": status["state"], "api": code, "loaded": loaded}))
    """
)


def test_the_client_imports_only_httpx_and_the_standard_library(broker, api, tmp_path):
    script = tmp_path / "blocked.py"
    script.write_text(BLOCKED_IMPORTS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKEN_BROKER_")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, str(script), broker.url, f"{api.endpoint}/users/{ORG}/0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {
        "changed": True,
        "headers": ["Authorization", "x-api-key", "x-gw-ims-org-id"],
        "state": "fresh",
        "api": 200,
        "loaded": [],
    }
