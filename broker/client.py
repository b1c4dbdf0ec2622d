"""The Python client of the token broker (``docs/using-tokens.md``).

Imports only httpx and the standard library, so it installs wherever its
users' tools live (umapi-client, the User Sync Tool, scripts) without FastAPI,
uvicorn, pydantic or keyring::

    from broker.client import BrokerAuth, TokenBroker

    TokenBroker().token("adobe")                    # the bare access token
    httpx.get(url, auth=BrokerAuth("adobe"))        # every header an Adobe API call needs
    requests.get(url, auth=BrokerAuth("adobe"))     # the same object is a requests auth

Errors (``BrokerClientError`` is a ``broker.errors.BrokerError``, a module that
imports nothing either)::

    BrokerClientError      the broker answered other than asked (status, code, detail)
     ├── BrokerUnavailable cannot connect, no answer in time, 503 token_unavailable (retry_after)
     └── BrokerRefused     401 / 403 / 404: no or a wrong client key, not allowed, unknown name

No message, repr or exception text carries a token or a client key, whatever
answers on the broker's address (docs/security.md, 18.2): how an answer is quoted
is :func:`broker._client_calls._quotable`'s, and every call is a flow of that
module, run by a sync or an async driver here.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import weakref
from collections.abc import AsyncGenerator, Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from broker._client_calls import DEFAULT_URL as DEFAULT_URL  # re-exported: the public names
from broker._client_calls import EXPIRES_IN_HEADER as EXPIRES_IN_HEADER
from broker._client_calls import (
    KEY_ENV,
    KEY_FILE_ENV,
    BrokerClientError,
    BrokerRefused,
    BrokerUnavailable,
    Endpoint,
    Flow,
    T,
    _Call,
    _credentials_flow,
    _headers_flow,
    _health_flow,
    _quotable,
    _refresh_flow,
    _reload_flow,
    _rotate_flow,
    _status_flow,
    _token_flow,
    _token_info_flow,
)
from broker._client_calls import URL_ENV as URL_ENV

__all__ = [
    "DEFAULT_URL",
    "KEY_ENV",
    "KEY_FILE_ENV",
    "URL_ENV",
    "AsyncTokenBroker",
    "BrokerAuth",
    "BrokerClientError",
    "BrokerRefused",
    "BrokerUnavailable",
    "Endpoint",
    "TokenBroker",
]
# The public classes defined beside the flows say they are this module's, as httpx's do:
# tracebacks and reprs name the import path users know.
for _public in (BrokerClientError, BrokerRefused, BrokerUnavailable, Endpoint):
    _public.__module__ = __name__

#: BrokerAuth keeps headers until the token has less than this left (the cache is described
#: in ``docs/using-tokens.md``); see keep_for.
CACHE_MARGIN = 300.0
#: A forced refresh waits for the issuer (its own timeout is 10 s by default, plus a free
#: slot): a short client timeout would give up on a refresh that is about to succeed.
REFRESH_TIMEOUT = 30.0


# -- the two clients ------------------------------------------------------------------


class _Base:
    """What both clients share: the address, the client key, the timeout, extra headers."""

    def __init__(
        self,
        url: str | Endpoint | None = None,
        *,
        key: str | None = None,
        timeout: float = 5.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._endpoint = url if isinstance(url, Endpoint) else Endpoint.parse(url)
        self._key = key or None
        self.timeout = timeout
        self._sent_headers = dict(headers or {})
        self._lock = threading.Lock()  # TokenBroker's pool

    @property
    def url(self) -> str:
        return self._endpoint.url

    def __repr__(self) -> str:  # never the key
        return f"{type(self).__name__}({self.url!r})"

    def _client_key(self) -> str | None:
        """``key``, else ``$TOKEN_BROKER_CLIENT_KEY``, else the file ``$..._KEY_FILE`` names.

        Read at every request, so a key file can be rotated under a running program.
        """
        if key := self._key or os.environ.get(KEY_ENV):
            return key
        if not (path := os.environ.get(KEY_FILE_ENV)):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().strip() or None
        except OSError as exc:
            raise BrokerClientError(
                f"cannot read the client key from {path} (${KEY_FILE_ENV}): "
                f"{exc.strerror or type(exc).__name__}"
            ) from None

    def _request(self, client: httpx.Client | httpx.AsyncClient, call: _Call) -> httpx.Request:
        headers = {"X-Token-Broker": "1", **self._sent_headers}
        if key := self._client_key():
            headers["Authorization"] = f"Bearer {key}"
        timeout = max(self.timeout, REFRESH_TIMEOUT) if call.long else self.timeout
        url = self._endpoint.base + call.path
        return client.build_request(call.method, url, headers=headers, timeout=timeout)

    def _unavailable(self, exc: httpx.HTTPError, sent: Mapping[str, str]) -> BrokerUnavailable:
        """The error for a request that got no usable answer, quoting nothing it received."""
        name = type(exc).__name__
        if isinstance(exc, httpx.TimeoutException):
            why = f"no answer within {self.timeout:g}s ({name})"
        elif isinstance(exc, httpx.ProtocolError | httpx.DecodingError):
            # h11 quotes the offending bytes ("illegal header line: b'...'"), and whatever
            # answers there may have put the request's key into them.
            why = f"{name}: the answer is not HTTP as the broker speaks it"
        else:
            # The OS error ("[Errno 111] Connection refused"), checked all the same.
            secrets = (sent.get("Authorization", "").removeprefix("Bearer "),)
            why = f"{name}: {_quotable(str(exc), secrets)}" if str(exc) else name
        return BrokerUnavailable(f"cannot reach the token broker at {self.url} ({why})")

    async def _arun_once(self, flow: Flow[T]) -> T:
        """Run ``flow`` on a short-lived async client of this event loop: BrokerAuth's async
        half may be driven from any number of loops; a client bound to one breaks in the next."""
        async with httpx.AsyncClient(
            transport=self._endpoint.async_transport(), trust_env=False
        ) as client:
            return await _drive_async(self, client, flow)


_SEND_FAILED = (httpx.TransportError, httpx.DecodingError)


def _drive_sync(base: _Base, client: httpx.Client, flow: Flow[T]) -> T:
    try:
        call = next(flow)
        while True:
            request = base._request(client, call)
            try:
                response = client.send(request)
            except _SEND_FAILED as exc:
                failure = base._unavailable(exc, request.headers)
                break
            call = flow.send(response)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    raise failure  # here, so httpx's error (with its text) is not its context


async def _drive_async(base: _Base, client: httpx.AsyncClient, flow: Flow[T]) -> T:
    try:
        call = next(flow)
        while True:
            request = base._request(client, call)
            try:
                response = await client.send(request)
            except _SEND_FAILED as exc:
                failure = base._unavailable(exc, request.headers)
                break
            call = flow.send(response)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    raise failure  # here, so httpx's error (with its text) is not its context


class TokenBroker(_Base):
    """A client of a running token broker. Thread-safe; one connection pool per instance.

    Args:
        url: ``http://HOST:PORT`` or ``unix:/path/to.sock``; default
            ``$TOKEN_BROKER_URL``, else ``http://127.0.0.1:8765``.
        key: the client key; default ``$TOKEN_BROKER_CLIENT_KEY``, else the content
            of the file ``$TOKEN_BROKER_CLIENT_KEY_FILE`` names (read per request).
        timeout: seconds per request (a forced refresh, a reload and a secret cycle
            wait at least 30 s).
        headers: sent with every request besides ``X-Token-Broker: 1`` and the key:
            ``{"X-Other": "1"}`` for a broker whose ``require_header`` is ``X-Other``.

    ``name=None`` in every method means the broker's default credential.
    """

    _client: httpx.Client | None = None

    def __enter__(self) -> TokenBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool (the next call opens a new one)."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def _run(self, flow: Flow[T]) -> T:
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    # trust_env=False: an HTTP(S)_PROXY meant for the internet must not
                    # carry loopback requests (the broker refuses proxied ones anyway).
                    self._client = httpx.Client(
                        transport=self._endpoint.transport(), trust_env=False
                    )
                client = self._client
        return _drive_sync(self, client, flow)

    def token(self, name: str | None = None) -> str:
        """The access token of ``name``, nothing else."""
        return self._run(_token_flow(name, self.url))

    def headers(self, name: str | None = None) -> dict[str, str]:
        """The headers an API call needs (Adobe: Authorization, x-api-key, x-gw-ims-org-id)."""
        return self._run(_headers_flow(name, self.url))[0]

    def status(self, name: str | None = None) -> dict[str, Any]:
        """The status JSON of ``name`` (state, expires_at, last_error, ...; never a token)."""
        return self._run(_status_flow(name, self.url))

    def refresh(self, name: str | None = None) -> None:
        """Force a refresh now and return once it is done (a ``429 refresh_cooldown`` is not
        an error: somebody refreshed moments ago)."""
        self._run(_refresh_flow(name, self.url))

    def _token_info(self, name: str) -> dict[str, Any]:
        """``/v1/credentials/NAME/token``: access_token, expires_in, expires_at (for exec)."""
        return self._run(_token_info_flow(name, self.url))

    def credentials(self) -> list[dict[str, Any]]:
        """The status JSON of every credential this client may read (the default marked)."""
        return self._run(_credentials_flow(self.url))

    def health(self, *, ready: bool = False) -> dict[str, Any]:
        """``/healthz``: the daemon runs; ``ready``: ``/readyz``, every credential has a
        servable token (else BrokerUnavailable, ``code`` ``not_ready``)."""
        return self._run(_health_flow(ready, self.url))

    def reload(self) -> dict[str, list[str]]:
        """Make the daemon re-read its config and secrets, as SIGHUP does; what changed. An
        administrator's act: with client keys, a key whose credentials are ``"*"`` (or, over
        the unix socket, root or the daemon's own user)."""
        return self._run(_reload_flow(self.url))

    def rotate(self, name: str) -> dict[str, Any]:
        """Have the daemon cycle the secret of ``name`` through Adobe's I/O Management
        API now, and return the cycle's outcome (an administrator's act, as reload)."""
        return self._run(_rotate_flow(name, self.url))


class AsyncTokenBroker(_Base):
    """:class:`TokenBroker` for asyncio: the same methods, awaitable.

    Its connection pool belongs to the event loop of the first call; close it
    with ``await aclose()`` or ``async with AsyncTokenBroker() as broker``.
    """

    _client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> AsyncTokenBroker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def _run(self, flow: Flow[T]) -> T:
        if self._client is None:
            self._client = httpx.AsyncClient(
                transport=self._endpoint.async_transport(), trust_env=False
            )
        return await _drive_async(self, self._client, flow)

    async def token(self, name: str | None = None) -> str:
        return await self._run(_token_flow(name, self.url))

    async def headers(self, name: str | None = None) -> dict[str, str]:
        return (await self._run(_headers_flow(name, self.url)))[0]

    async def status(self, name: str | None = None) -> dict[str, Any]:
        return await self._run(_status_flow(name, self.url))

    async def refresh(self, name: str | None = None) -> None:
        await self._run(_refresh_flow(name, self.url))

    async def credentials(self) -> list[dict[str, Any]]:
        return await self._run(_credentials_flow(self.url))

    async def health(self, *, ready: bool = False) -> dict[str, Any]:
        return await self._run(_health_flow(ready, self.url))

    async def reload(self) -> dict[str, list[str]]:
        return await self._run(_reload_flow(self.url))

    async def rotate(self, name: str) -> dict[str, Any]:
        return await self._run(_rotate_flow(name, self.url))


# -- BrokerAuth -----------------------------------------------------------------------


_Found = tuple[dict[str, str], float | None]  # headers, and the seconds their token has left


@dataclass(frozen=True)
class _Cached:
    headers: dict[str, str] = field(repr=False)
    until: float  # the BrokerAuth clock's reading after which the broker is asked again


def keep_for(seconds_left: float | None) -> float:
    """How long BrokerAuth keeps headers whose token has ``seconds_left``.

    Until under 5 minutes remain; a token with less than 10 minutes left (a
    120 s demo token, or one fetched late) is kept for half of what it has
    left (60 s of a fresh demo token, which the broker serves for 108 s), so it is
    never used near its end. No expiry known (a broker from
    before ``X-Token-Expires-In``): not kept at all.
    """
    if seconds_left is None or seconds_left <= 0:
        return 0.0
    return max(seconds_left - CACHE_MARGIN, seconds_left / 2)


class BrokerAuth(httpx.Auth):
    """Authenticate API calls with the broker's headers: an httpx ``Auth`` and a requests auth.

    ``httpx.Client(auth=BrokerAuth("adobe"))``, ``httpx.AsyncClient(auth=...)``,
    ``requests.get(url, auth=BrokerAuth("adobe"))`` and
    ``umapi_client.Connection(org_id, auth=BrokerAuth("adobe"))`` all work; the
    package does not depend on requests (its hook is duck-typed).

    Every header of ``/v1/credentials/NAME/headers`` is added, and kept until
    the token has under 5 minutes left (see :func:`keep_for`). When the API
    answers 401, the broker's current headers are taken if it has moved on
    already, else the token is refreshed at the broker (once); the request is
    sent again once, if its body can be sent again (a streamed body: the 401
    is returned). Many threads (or tasks) that get a 401 for the same headers
    cause one refresh: the first refreshes, the others find newer headers
    than the ones refused and just send again with those.

    The headers belong to the origin (scheme, host, port) of the request they
    were added to: a request is sent again only there. A 401 from another
    origin, after a redirect (which both libraries follow without the token),
    is returned as it is: nothing is refreshed and nothing is added.

    Args:
        name: the credential; None: the broker's default credential.
        broker: a :class:`TokenBroker` (or :class:`AsyncTokenBroker`) whose URL,
            key and timeout to use; default ``TokenBroker()``.
    """

    requires_request_body = False  # a streamed upload stays streamed (and is not replayed)
    requires_response_body = False

    def __init__(
        self, name: str | None = None, *, broker: TokenBroker | AsyncTokenBroker | None = None
    ) -> None:
        self.name = name
        self._owned = not isinstance(broker, TokenBroker)  # made here, so close() closes it
        if isinstance(broker, AsyncTokenBroker):
            # The sync half needs a sync client; the async half opens its own per loop.
            broker = TokenBroker(
                broker._endpoint, key=broker._key, timeout=broker.timeout,
                headers=broker._sent_headers,
            )  # fmt: skip
        self._broker = TokenBroker() if broker is None else broker
        self._cached: _Cached | None = None
        self._cache = True  # bench/bench.py turns this off to measure the round trip
        self._clock: Callable[[], float] = time.monotonic  # tests drive it
        self._lock = threading.Lock()  # single flight among threads
        self._loop_locks_guard = threading.Lock()  # never held across I/O
        self._loop_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )

    def __repr__(self) -> str:
        return f"BrokerAuth({self.name!r}, broker={self._broker!r})"

    def close(self) -> None:
        """Close the connection pool of the TokenBroker this object made itself."""
        if self._owned:
            self._broker.close()

    # -- the cache, shared by both halves ---------------------------------------------

    def _store(self, found: _Found) -> dict[str, str]:
        headers, left = found
        keep = keep_for(left) if self._cache else 0.0
        self._cached = _Cached(headers, self._clock() + keep)
        return headers

    def _hit(self) -> dict[str, str] | None:
        cached = self._cached  # one read: another thread may replace it meanwhile
        return cached.headers if cached is not None and self._clock() < cached.until else None

    def _plan(self, refused: dict[str, str] | None) -> dict[str, str] | Flow[_Found]:
        """The headers to use as they are, or the flow that asks the broker for them; with
        the single-flight lock held. ``refused``: the headers the API answered 401 to."""
        cached = self._cached  # one read: another thread may replace it meanwhile
        if refused is not None and (cached is None or cached.headers == refused):
            return self._renew_flow(refused)  # nobody has replaced what was refused
        if cached is not None and self._clock() < cached.until:
            return cached.headers
        return _headers_flow(self.name, self._broker.url)

    def _renew_flow(self, refused: dict[str, str]) -> Flow[_Found]:
        """The headers to send again with after the API refused ``refused`` with a 401: the
        broker's current ones if they differ (it moved on already, e.g. after its scheduled
        refresh), else those after a forced refresh."""
        url = self._broker.url
        found = yield from _headers_flow(self.name, url)
        if found[0] != refused:
            return found
        yield from _refresh_flow(self.name, url)  # a 429 means another just refreshed: fine
        return (yield from _headers_flow(self.name, url))

    # -- sync (threads) ----------------------------------------------------------------

    def _current(self, refused: dict[str, str] | None = None) -> dict[str, str]:
        if refused is None and (hit := self._hit()) is not None:
            return hit
        with self._lock:  # a cold start of 50 threads is one request too
            plan = self._plan(refused)
            return plan if isinstance(plan, dict) else self._store(self._broker._run(plan))

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        used = self._current()
        request.headers.update(used)
        response = yield request
        if not _send_again(request, response):
            return
        request.headers.update(self._current(used))
        yield request

    # -- async (tasks of any event loop) ----------------------------------------------

    def _loop_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        with self._loop_locks_guard:
            return self._loop_locks.setdefault(loop, asyncio.Lock())

    async def _acurrent(self, refused: dict[str, str] | None = None) -> dict[str, str]:
        if refused is None and (hit := self._hit()) is not None:
            return hit
        async with self._loop_lock():
            plan = self._plan(refused)
            if isinstance(plan, dict):
                return plan
            return self._store(await self._broker._arun_once(plan))

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        used = await self._acurrent()
        request.headers.update(used)
        response = yield request
        if not _send_again(request, response):
            return
        request.headers.update(await self._acurrent(used))
        yield request

    # -- requests -----------------------------------------------------------------------

    def __call__(self, request: Any) -> Any:
        """requests' auth interface: add the headers, and a hook that sends a request that
        got a 401 again, once, with fresh headers (as requests' own digest auth does:
        through the same adapter, the 401 kept in ``history``).

        requests runs the hook for every hop of a redirect too, and strips the token from a
        hop to another host (CVE-2018-18074): a 401 from an origin other than the one the
        headers were added for is returned as it is, with nothing added.
        """
        used = self._current()
        request.headers.update(used)
        origin = _origin(request.url)

        def on_response(response: Any, **send_kwargs: Any) -> Any:
            sent = response.request
            adapter = getattr(response, "connection", None)
            if response.status_code != 401 or adapter is None:
                return response
            if origin is None or _origin(sent.url) != origin:
                return response
            if sent.body is not None and not isinstance(sent.body, bytes | str):
                return response  # a file or a generator: it cannot be sent a second time
            fresh = self._current(used)
            response.content  # noqa: B018 - read it, so the connection goes back to the pool
            response.close()
            again = sent.copy()
            again.headers.update(fresh)
            # copy() shares the hook lists: the second answer must not come back here.
            again.hooks = {
                event: [h for h in hooks if h is not on_response]
                for event, hooks in sent.hooks.items()
            }
            retried = adapter.send(again, **send_kwargs)
            retried.history.append(response)
            retried.request = again
            return retried

        request.register_hook("response", on_response)
        return request


def _send_again(request: httpx.Request, response: httpx.Response) -> bool:
    """Whether an httpx request that got ``response`` is sent again with fresh headers.

    Only after a 401 from the origin the headers were added for: httpx hands the flow
    the last answer of a redirect chain, and a 401 from another origin (which httpx
    sent no token) says nothing of the token and must not cause a refresh. And only
    if the body is in memory (or absent), so the request can be sent again.
    """
    if response.status_code != 401:
        return False
    origin = _origin(request.url)
    if origin is None or _origin(response.request.url) != origin:
        return False
    try:
        request.content  # noqa: B018
    except httpx.RequestNotRead:
        return False
    return True


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(url: object) -> tuple[str, str, int] | None:
    """(scheme, host, port) of ``url``, the port made explicit; None if it has none.

    A token is bound to the origin it was first added for: it is sent again only there.
    """
    parts = urlsplit(str(url))
    scheme = parts.scheme.lower()
    try:
        port = parts.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:  # a port that is not a number
        return None
    if not parts.hostname or port is None:
        return None
    return scheme, parts.hostname.lower(), port
