"""broker.client against httpx.MockTransport: error mapping, key sources, names, the cache."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from helpers import FakeClock

from broker.client import (
    AsyncTokenBroker,
    BrokerAuth,
    BrokerClientError,
    BrokerRefused,
    BrokerUnavailable,
    Endpoint,
    TokenBroker,
    keep_for,
)

URL = "http://127.0.0.1:8765"
KEY = "tbk_unit-test-client-key-0123456789"
TOKENS = ["tok-one-0123456789abcdef", "tok-two-0123456789abcdef", "tok-three-0123456789abc"]

HEADERS = "GET /v1/credentials/main/headers"
REFRESH = "POST /v1/credentials/main/refresh"
Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("TOKEN_BROKER_URL", "TOKEN_BROKER_CLIENT_KEY", "TOKEN_BROKER_CLIENT_KEY_FILE"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def route(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Handler], list[httpx.Request]]]:
    """Send every broker request of the client to ``handler``; return the requests seen."""

    def install(handler: Handler) -> list[httpx.Request]:
        seen: list[httpx.Request] = []

        def record(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return handler(request)

        mock = httpx.MockTransport(record)
        monkeypatch.setattr(Endpoint, "transport", lambda self: mock)
        monkeypatch.setattr(Endpoint, "async_transport", lambda self: mock)
        return seen

    yield install


class FakeBroker:
    """The broker's routes for one or two credentials; ``current`` is the token served."""

    def __init__(self, *, expires_in: int | None = 3600, default: str = "main") -> None:
        self.index = 0
        self.expires_in = expires_in
        self.default = default
        self.refresh_status = 200
        self.lock = threading.Lock()

    @property
    def current(self) -> str:
        return TOKENS[self.index]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/credentials":
            rows = [{"name": n, "default": n == self.default} for n in ("main", "other")]
            return httpx.Response(200, json=rows)
        if path.endswith("/refresh"):
            with self.lock:
                if self.refresh_status == 200:
                    self.index += 1
            if self.refresh_status == 429:
                self.index += 1  # the refresh that made ours too soon
                body = {"error": "refresh_cooldown", "detail": "refreshed moments ago"}
                return httpx.Response(429, json=body, headers={"Retry-After": "9"})
            return httpx.Response(self.refresh_status, json={"name": "main"})
        if path.endswith("/headers"):
            headers = {}
            if self.expires_in is not None:
                headers["X-Token-Expires-In"] = str(self.expires_in)
            body = {"Authorization": f"Bearer {self.current}", "x-api-key": "cid"}
            return httpx.Response(200, json=body, headers=headers)
        if path.endswith("/rotate"):
            return httpx.Response(200, json={"outcome": "cycled", "detail": "new secret in use"})
        if path.startswith("/v1/credentials/"):
            return httpx.Response(200, json={"name": path.rsplit("/", 1)[1], "state": "fresh"})
        if path == "/v1/reload":
            return httpx.Response(200, json={"added": [], "unchanged": ["main", "other"]})
        if path in ("/healthz", "/readyz"):
            return httpx.Response(200, json={"status": "ok" if path == "/healthz" else "ready"})
        if path.startswith("/token"):
            return httpx.Response(200, text=self.current)
        return httpx.Response(404, json={"error": "not_found", "detail": path})


def paths(seen: list[httpx.Request]) -> list[str]:
    return [f"{r.method} {r.url.path}" for r in seen]


def no_secret_in(exc: BaseException) -> None:
    for text in (str(exc), repr(exc)):
        assert KEY not in text
        for token in TOKENS:
            assert token not in text


# -- addresses --------------------------------------------------------------------------


def test_url_from_argument_environment_or_default(monkeypatch):
    assert Endpoint.parse(None) == Endpoint(URL, URL)
    monkeypatch.setenv("TOKEN_BROKER_URL", "http://127.0.0.1:9999/")
    assert Endpoint.parse(None).base == "http://127.0.0.1:9999"
    assert Endpoint.parse("127.0.0.1:7777").base == "http://127.0.0.1:7777"
    sock = Endpoint.parse("unix:/run/token-broker/broker.sock")
    assert (sock.uds, sock.base, sock.url) == (
        "/run/token-broker/broker.sock",
        "http://localhost",
        "unix:/run/token-broker/broker.sock",
    )
    assert Endpoint.parse("unix:///tmp/b.sock").uds == "/tmp/b.sock"


@pytest.mark.parametrize(
    "bad", ["ftp://127.0.0.1:1", "unix:relative.sock", "http://user:pw@127.0.0.1:1", "http://"]
)
def test_bad_urls_are_refused_with_a_sentence(bad):
    with pytest.raises(BrokerClientError) as info:
        Endpoint.parse(bad)
    assert "pw" not in str(info.value) or "user" not in bad


def test_a_key_put_in_a_bad_url_is_not_quoted():
    with pytest.raises(BrokerClientError) as info:
        Endpoint.parse(f"ftp://user:{KEY}@127.0.0.1:1")
    assert KEY not in str(info.value) and "ftp://…@127.0.0.1:1" in str(info.value)


# -- error mapping ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code"),
    [(401, "unauthorized"), (403, "forbidden"), (404, "unknown_credential")],
)
def test_401_403_404_are_refusals_with_the_brokers_code(route, status, code):
    route(lambda r: httpx.Response(status, json={"error": code, "detail": "no."}))
    with pytest.raises(BrokerRefused) as info:
        TokenBroker(key=KEY).token("main")
    assert info.value.code == code and info.value.status == status
    assert URL in str(info.value)
    no_secret_in(info.value)


def test_503_is_unavailable_with_retry_after(route):
    body = {"error": "token_unavailable", "detail": "no servable token", "last_error": None}
    route(lambda r: httpx.Response(503, json=body, headers={"Retry-After": "17"}))
    with pytest.raises(BrokerUnavailable) as info:
        TokenBroker().token()
    assert info.value.retry_after == 17.0 and info.value.code == "token_unavailable"
    assert isinstance(info.value, BrokerClientError)


def test_cannot_connect_is_unavailable_naming_the_url(route):
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused")

    route(refuse)
    for key in (KEY, None):
        with pytest.raises(BrokerUnavailable) as info:
            TokenBroker("http://127.0.0.1:4321", key=key).headers("main")
        assert str(info.value) == (
            "cannot reach the token broker at http://127.0.0.1:4321 "
            "(ConnectError: [Errno 111] Connection refused)"
        )
        assert info.value.retry_after is None
        no_secret_in(info.value)


def test_a_timeout_is_unavailable(route):
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out")

    route(slow)
    with pytest.raises(BrokerUnavailable, match="no answer within 5s"):
        TokenBroker().status("main")


def test_other_errors_keep_status_and_code_and_never_quote_a_foreign_body(route):
    route(lambda r: httpx.Response(500, text=f"<html>oops {TOKENS[0]}</html>"))
    with pytest.raises(BrokerClientError) as info:
        TokenBroker().token()
    assert info.value.status == 500 and info.value.code == "http_500"
    assert not isinstance(info.value, BrokerRefused | BrokerUnavailable)
    no_secret_in(info.value)


def test_refresh_treats_429_as_done_and_502_as_an_error(route):
    fake = FakeBroker()
    seen = route(fake)
    fake.refresh_status = 429
    assert TokenBroker().refresh("main") is None
    fake.refresh_status = 502
    with pytest.raises(BrokerClientError) as info:
        TokenBroker().refresh("main")
    assert info.value.status == 502
    assert paths(seen) == ["POST /v1/credentials/main/refresh"] * 2


def test_the_detail_is_kept_whole_and_the_message_quotes_300_characters(route):
    detail = "/etc/token-broker/config.toml: [credentials.a] rotate_every: " + "why " * 200
    route(lambda r: httpx.Response(400, json={"error": "config_error", "detail": detail}))
    with pytest.raises(BrokerClientError) as info:
        TokenBroker().reload()
    assert info.value.detail == detail
    assert str(info.value).endswith(detail[:300] + "…")
    assert (info.value.status, info.value.code) == (400, "config_error")


def test_a_detail_with_the_key_is_withheld_from_the_attribute_too(route):
    route(lambda r: httpx.Response(401, json={"error": "unauthorized", "detail": f"no {KEY}"}))
    with pytest.raises(BrokerRefused) as info:
        TokenBroker(key=KEY).credentials()
    assert info.value.detail is not None and KEY[:12] not in info.value.detail
    assert "not quoted" in info.value.detail
    no_secret_in(info.value)


def test_list_health_reload_and_rotate(route):
    seen = route(FakeBroker())
    broker = TokenBroker()
    assert [row["name"] for row in broker.credentials()] == ["main", "other"]
    assert broker.health() == {"status": "ok"}
    assert broker.health(ready=True) == {"status": "ready"}
    assert broker.reload() == {"added": [], "unchanged": ["main", "other"]}
    assert broker.rotate("main")["outcome"] == "cycled"
    assert paths(seen) == ["GET /v1/credentials", "GET /healthz", "GET /readyz",
                           "POST /v1/reload", "POST /v1/credentials/main/rotate"]  # fmt: skip
    assert [r.extensions["timeout"]["read"] for r in seen[-2:]] == [30.0, 30.0]  # they wait


def test_not_ready_is_unavailable_with_the_brokers_detail(route):
    body = {"error": "not_ready", "detail": "no servable token for: main"}
    route(lambda r: httpx.Response(503, json=body))
    with pytest.raises(BrokerUnavailable) as info:
        TokenBroker().health(ready=True)
    assert (info.value.code, info.value.detail) == ("not_ready", "no servable token for: main")


def test_a_reload_answer_that_is_not_lists_of_names_is_an_error(route):
    route(lambda r: httpx.Response(200, json={"added": "main"}))
    with pytest.raises(BrokerClientError, match="other than lists of names"):
        TokenBroker().reload()


# -- the client key ---------------------------------------------------------------------


def test_header_and_key_sources(route, monkeypatch, tmp_path):
    seen = route(FakeBroker())
    TokenBroker().token()
    assert seen[-1].headers["X-Token-Broker"] == "1"
    assert "Authorization" not in seen[-1].headers
    monkeypatch.setenv("TOKEN_BROKER_CLIENT_KEY", "from-env")
    TokenBroker().token()
    assert seen[-1].headers["Authorization"] == "Bearer from-env"
    TokenBroker(key=KEY).token()
    assert seen[-1].headers["Authorization"] == f"Bearer {KEY}"
    assert KEY not in repr(TokenBroker(key=KEY))
    # A broker whose require_header names another header: the caller adds it.
    TokenBroker(key=KEY, headers={"X-Other": "1"}).status("main")
    assert seen[-1].headers["X-Other"] == "1" and seen[-1].headers["X-Token-Broker"] == "1"
    assert seen[-1].headers["Authorization"] == f"Bearer {KEY}"


def test_the_key_file_is_read_again_for_every_request(route, monkeypatch, tmp_path):
    seen = route(FakeBroker())
    key_file = tmp_path / "key"
    key_file.write_text("first-key\n")
    monkeypatch.setenv("TOKEN_BROKER_CLIENT_KEY_FILE", str(key_file))
    broker = TokenBroker()
    broker.token()
    key_file.write_text("second-key\n")  # rotated under the running program
    broker.token()
    assert [r.headers["Authorization"] for r in seen] == ["Bearer first-key", "Bearer second-key"]
    key_file.unlink()
    with pytest.raises(BrokerClientError) as info:
        broker.token()
    assert str(key_file) in str(info.value) and "second-key" not in str(info.value)


# -- the default credential ---------------------------------------------------------------


def test_no_name_means_the_default_learned_from_the_list(route):
    seen = route(FakeBroker(default="other"))
    broker = TokenBroker()
    assert broker.token() == TOKENS[0]
    assert broker.headers()["x-api-key"] == "cid"
    assert broker.status()["name"] == "other"
    broker.refresh()
    assert paths(seen) == [
        "GET /token",  # the broker serves its default here itself
        "GET /v1/credentials",
        "GET /v1/credentials/other/headers",
        "GET /v1/credentials",
        "GET /v1/credentials",
        "POST /v1/credentials/other/refresh",
    ]


def test_no_default_is_a_refusal(route):
    route(FakeBroker(default="nobody"))
    with pytest.raises(BrokerRefused) as info:
        TokenBroker().headers()
    assert info.value.code == "unknown_credential"


def test_a_broker_without_the_default_field_and_one_credential(route):
    def old(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/credentials":
            return httpx.Response(200, json=[{"name": "only"}])
        return httpx.Response(200, json={"name": "only", "state": "fresh"})

    route(old)
    assert TokenBroker().status()["name"] == "only"


async def test_the_async_client_has_the_same_methods(route):
    fake = FakeBroker()
    seen = route(fake)
    async with AsyncTokenBroker(key=KEY) as broker:
        assert await broker.token("main") == TOKENS[0]
        assert (await broker.headers())["Authorization"] == f"Bearer {TOKENS[0]}"
        assert (await broker.status("main"))["state"] == "fresh"
        await broker.refresh("main")
        assert await broker.token("main") == TOKENS[1]
        assert len(await broker.credentials()) == 2
        assert (await broker.health(ready=True))["status"] == "ready"
        assert (await broker.reload())["unchanged"] == ["main", "other"]
        assert (await broker.rotate("main"))["outcome"] == "cycled"
    assert all(r.headers["Authorization"] == f"Bearer {KEY}" for r in seen)


# -- BrokerAuth: the header cache -------------------------------------------------------


def api_ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"auth": request.headers.get("authorization")})


def test_keep_for():
    assert keep_for(86399) == 86399 - 300  # a day: until 5 minutes are left
    assert keep_for(900) == 600
    assert keep_for(120) == 60  # shorter than 10 minutes: half of what is left
    assert keep_for(1) == 0.5
    assert keep_for(0) == 0 and keep_for(None) == 0


@pytest.mark.parametrize(("expires_in", "kept"), [(3600, 3300), (120, 60)])
def test_headers_are_kept_until_the_token_nears_its_end(route, expires_in, kept):
    fake = FakeBroker(expires_in=expires_in)
    seen = route(fake)
    auth = BrokerAuth("main")
    auth._clock = clock = FakeClock(1000.0)
    with httpx.Client(transport=httpx.MockTransport(api_ok), auth=auth) as api:
        for _ in range(3):
            assert api.get("http://api.test/x").json()["auth"] == f"Bearer {TOKENS[0]}"
        assert len(seen) == 1
        clock.now += kept - 0.001
        api.get("http://api.test/x")
        assert len(seen) == 1
        fake.index = 1  # the broker refreshed on its schedule meanwhile
        clock.now += 0.002
        assert api.get("http://api.test/x").json()["auth"] == f"Bearer {TOKENS[1]}"
        assert paths(seen) == ["GET /v1/credentials/main/headers"] * 2


def test_without_an_expiry_nothing_is_kept(route):
    seen = route(FakeBroker(expires_in=None))
    with httpx.Client(transport=httpx.MockTransport(api_ok), auth=BrokerAuth("main")) as api:
        api.get("http://api.test/x")
        api.get("http://api.test/x")
    assert len(seen) == 2


def test_broker_auth_adds_every_header_and_its_repr_holds_none(route):
    route(FakeBroker())
    auth = BrokerAuth("main", broker=TokenBroker(key=KEY))
    seen: list[httpx.Request] = []

    def api(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    with httpx.Client(transport=httpx.MockTransport(api), auth=auth) as c:
        c.get("http://api.test/x")
    assert seen[0].headers["authorization"] == f"Bearer {TOKENS[0]}"
    assert seen[0].headers["x-api-key"] == "cid"
    assert TOKENS[0] not in repr(auth) and KEY not in repr(auth)


# -- BrokerAuth: 401 ----------------------------------------------------------------------


class Api:
    """An API that accepts only the token it was told is current (``accept``)."""

    def __init__(self, accept: str, barrier: threading.Barrier | None = None) -> None:
        self.accept = accept
        self.barrier = barrier
        self.calls: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        auth = request.headers.get("authorization", "")
        self.calls.append(auth)
        if auth == f"Bearer {self.accept}":
            return httpx.Response(200, json={"ok": True})
        if self.barrier is not None:
            self.barrier.wait(timeout=30)  # every thread holds its 401 at the same moment
        return httpx.Response(401, json={"error": "invalid_token"})


def refreshes(seen: list[httpx.Request]) -> list[str]:
    return [p for p in paths(seen) if p.endswith("/refresh")]


def test_a_401_refreshes_once_and_sends_again(route):
    fake = FakeBroker()
    seen = route(fake)
    api = Api(TOKENS[0])
    with httpx.Client(transport=httpx.MockTransport(api), auth=BrokerAuth("main")) as c:
        assert c.get("http://api.test/x").status_code == 200
        api.accept = TOKENS[1]  # the API refuses the current token from now on
        r = c.post("http://api.test/x", content=b'{"a": 1}')
    assert r.status_code == 200
    # The broker still serves the refused token: refresh it, then take the new one.
    assert paths(seen) == [HEADERS, HEADERS, REFRESH, HEADERS]
    assert api.calls == [f"Bearer {TOKENS[0]}", f"Bearer {TOKENS[0]}", f"Bearer {TOKENS[1]}"]


def test_a_401_takes_the_brokers_newer_token_without_a_refresh(route):
    fake = FakeBroker()
    seen = route(fake)
    api = Api(TOKENS[0])
    with httpx.Client(transport=httpx.MockTransport(api), auth=BrokerAuth("main")) as c:
        c.get("http://api.test/x")
        fake.index = 1  # the broker's scheduled refresh; the cached headers are still kept
        api.accept = TOKENS[1]
        assert c.get("http://api.test/x").status_code == 200
    assert paths(seen) == [HEADERS, HEADERS]


class Streaming(httpx.BaseTransport):
    """Consumes a request body as a real transport does (MockTransport buffers it first)."""

    def __init__(self, api: Api) -> None:
        self.api = api

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        b"".join(request.stream)  # type: ignore[arg-type]
        return self.api(request)


def test_a_streamed_body_gets_the_401(route):
    seen = route(FakeBroker())

    def body() -> Iterator[bytes]:
        yield b"chunk"

    api = Api(TOKENS[1])
    with httpx.Client(transport=Streaming(api), auth=BrokerAuth("main")) as c:
        assert c.post("http://api.test/x", content=body()).status_code == 401
        assert c.post("http://api.test/x", content=b"in memory").status_code == 200
    # The buffered body was sent again after a refresh; the streamed one was not.
    assert paths(seen) == [HEADERS, HEADERS, REFRESH, HEADERS]
    assert len(api.calls) == 3


def test_a_429_cooldown_takes_the_current_headers(route):
    fake = FakeBroker()
    seen = route(fake)
    api = Api(TOKENS[0])
    with httpx.Client(transport=httpx.MockTransport(api), auth=BrokerAuth("main")) as c:
        c.get("http://api.test/x")
        api.accept = TOKENS[1]
        fake.refresh_status = 429  # somebody else's forced refresh ends just before ours
        assert c.get("http://api.test/x").status_code == 200
    assert paths(seen)[-2:] == [
        "POST /v1/credentials/main/refresh",
        "GET /v1/credentials/main/headers",
    ]
    assert api.calls[-1] == f"Bearer {TOKENS[1]}"


def test_a_second_401_is_returned(route):
    seen = route(FakeBroker())
    api = Api("no token at all")
    with httpx.Client(transport=httpx.MockTransport(api), auth=BrokerAuth("main")) as c:
        assert c.get("http://api.test/x").status_code == 401
    assert refreshes(seen) == ["POST /v1/credentials/main/refresh"]
    assert len(api.calls) == 2


def test_fifty_threads_with_a_401_cause_one_refresh(route):
    fake = FakeBroker()
    seen = route(fake)
    n = 50
    api = Api(TOKENS[0])
    with httpx.Client(transport=httpx.MockTransport(api), auth=BrokerAuth("main")) as c:
        c.get("http://api.test/x")  # warm: every thread starts from the same headers
        api.accept, api.barrier = TOKENS[1], threading.Barrier(n)
        statuses: list[int] = []

        def call() -> None:
            statuses.append(c.get("http://api.test/x").status_code)

        threads = [threading.Thread(target=call) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    # One refresh; the threads that waited for it send again with its headers, unasked.
    assert statuses == [200] * n
    assert refreshes(seen) == ["POST /v1/credentials/main/refresh"]
    assert fake.index == 1


async def test_fifty_tasks_with_a_401_cause_one_refresh(route):
    fake = FakeBroker()
    seen = route(fake)
    n = 50
    barrier = asyncio.Barrier(n)
    accept = [TOKENS[0]]

    async def api(request: httpx.Request) -> httpx.Response:
        if request.headers.get("authorization") == f"Bearer {accept[0]}":
            return httpx.Response(200)
        await barrier.wait()
        return httpx.Response(401)

    auth = BrokerAuth("main")
    async with httpx.AsyncClient(transport=httpx.MockTransport(api), auth=auth) as c:
        await c.get("http://api.test/x")
        accept[0] = TOKENS[1]
        results = await asyncio.gather(*(c.get("http://api.test/x") for _ in range(n)))
    assert [r.status_code for r in results] == [200] * n
    assert refreshes(seen) == ["POST /v1/credentials/main/refresh"]


def test_broker_errors_in_the_flow_carry_no_secret(route):
    body = {"error": "issuer_error", "detail": "issuer error (HTTP 400): invalid_client"}

    def broker(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/refresh"):
            return httpx.Response(502, json=body)
        return FakeBroker()(request)

    route(broker)
    api = Api(TOKENS[2])
    auth = BrokerAuth("main", broker=TokenBroker(key=KEY))
    with httpx.Client(transport=httpx.MockTransport(api), auth=auth) as c:
        with pytest.raises(BrokerClientError) as info:
            c.get("http://api.test/x")
    assert info.value.code == "issuer_error"
    no_secret_in(info.value)


def test_fifty_threads_on_a_cold_cache_ask_the_broker_once(route):
    fake = FakeBroker()

    def slow(request: httpx.Request) -> httpx.Response:
        time.sleep(0.2)  # widens the window in which the other threads also find no headers
        return fake(request)

    seen = route(slow)
    n = 50
    barrier = threading.Barrier(n)
    auth = BrokerAuth("main")
    with httpx.Client(transport=httpx.MockTransport(api_ok), auth=auth) as c:

        def call() -> None:
            barrier.wait(timeout=30)
            c.get("http://api.test/x")

        threads = [threading.Thread(target=call) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert paths(seen) == ["GET /v1/credentials/main/headers"]


def test_an_origin_is_scheme_host_and_port_with_the_default_port_made_explicit():
    from broker.client import _origin

    assert (
        _origin("http://API.test/x") == _origin("http://api.test:80/y") == ("http", "api.test", 80)
    )
    assert _origin("https://api.test/") == ("https", "api.test", 443)
    assert _origin("http://api.test:8443/") != _origin("https://api.test:8443/")
    assert _origin("http://api.test:1/") != _origin("http://api.test:2/")
    assert _origin("http://127.0.0.1/") != _origin("http://127.0.0.2/")
    assert _origin("http://api.test:port/") is None and _origin("ftp://api.test/") is None
    assert _origin("/relative") is None


def test_httpx_sends_again_only_to_the_origin_that_got_the_token(route):
    """The flow sees the last answer of a redirect chain: a 401 from another origin
    refreshes nothing and is not answered by sending the token again."""
    seen = route(FakeBroker())
    sent: list[tuple[str, str | None]] = []

    def api(request: httpx.Request) -> httpx.Response:
        sent.append((str(request.url), request.headers.get("authorization")))
        if request.url.host == "api.test":
            return httpx.Response(302, headers={"Location": "http://elsewhere.test/landing"})
        return httpx.Response(401)

    auth = BrokerAuth("main")
    with httpx.Client(transport=httpx.MockTransport(api), auth=auth, follow_redirects=True) as c:
        assert c.get("http://api.test/x").status_code == 401
    assert sent == [
        ("http://api.test/x", f"Bearer {TOKENS[0]}"),
        ("http://elsewhere.test/landing", None),
    ]
    assert paths(seen) == [HEADERS]


@pytest.mark.parametrize(
    "detail",
    [
        "issuer error (HTTP 400): invalid_client: Client ID is invalid (x-debug-id "
        "5c3e0a7e-1b2c-4d5e-8f90-a1b2c3d4e5f6)",
        "no servable token for: main, partner-api",
        "cannot read /run/user/1000/token-broker/adobe.secret: Permission denied",
        "a client key is required: Authorization: Bearer KEY",
        "org 4A5B6C7D8E9F0A1B2C3D4E5F@AdobeOrg; sha256 "
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    ],
)
def test_the_brokers_own_details_are_quoted_unchanged(route, detail):
    route(lambda r: httpx.Response(502, json={"error": "issuer_error", "detail": detail}))
    with pytest.raises(BrokerClientError) as info:
        TokenBroker(key=KEY).token("main")
    assert str(info.value).endswith(f"502 issuer_error: {detail}")


def test_credential_shapes_in_a_detail_are_redacted(route):
    detail = f"got Bearer {TOKENS[0]} and tbk_other-key_0123 and eyJhbGciOiJSUzI1NiJ9.eyJzdWIi0"
    route(lambda r: httpx.Response(500, json={"error": "x", "detail": detail}))
    with pytest.raises(BrokerClientError) as info:
        TokenBroker().token("main")
    assert str(info.value).endswith("500 x: got [redacted] and [redacted] and [redacted]")
