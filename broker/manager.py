"""Per-credential state: single-flight refresh, retry with backoff, scheduled jobs.

The scheduler is an optimisation: :meth:`Manager.token` checks expiry on
every call, so a missed job can never serve an expired token. Time comes from
an injected clock and jobs go through a small :class:`Scheduler` interface,
so the whole lifecycle runs under a fake clock in tests.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import httpx

from broker import config, secrets
from broker.config import CredentialSettings, Settings
from broker.errors import (
    BrokerError,
    ConfigError,
    ErrorInfo,
    IssuerError,
    RefreshCooldown,
    SecretError,
    TokenUnavailable,
    UnknownCredential,
)
from broker.logs import redact
from broker.metrics import Histogram
from broker.providers import fetch_token, issuer_client, token_request
from broker.providers.base import Issued
from broker.tokens import Clock, Token, refresh_at, retry_delay, rfc3339, servable, serve_until

log = logging.getLogger("broker.refresh")

#: Issuer requests in flight at once, over all credentials. With many credentials a
#: cold start would otherwise open hundreds of connections at the same moment and
#: time most of them out; the timeout clock starts only once a slot is free.
MAX_CONCURRENT_REFRESHES = 10

Job = Callable[[str], Awaitable[None]]  # called with the credential name


class Scheduler(Protocol):
    """Where refresh jobs live: one job per credential, replaced on every schedule."""

    def start(self) -> None: ...
    def schedule(self, name: str, when: float, job: Job) -> None: ...
    def cancel(self, name: str) -> None: ...
    def shutdown(self) -> None: ...


class APScheduler:
    """:class:`Scheduler` on APScheduler 3's AsyncIOScheduler (timers, no polling)."""

    def __init__(self) -> None:
        from apscheduler.events import EVENT_JOB_ERROR
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        # A date job is removed when it is submitted, so every schedule is a fresh
        # add_job(replace_existing=True); a late job still runs (misfire_grace_time=None).
        self._sched = AsyncIOScheduler(
            timezone=UTC,
            job_defaults={"misfire_grace_time": None, "coalesce": True, "max_instances": 1},
        )
        self._sched.add_listener(self._on_error, EVENT_JOB_ERROR)

    def start(self) -> None:
        self._sched.start()  # must run inside the event loop (APScheduler 3.11)

    def schedule(self, name: str, when: float, job: Job) -> None:
        self._sched.add_job(
            job,  # a coroutine function, so the AsyncIOExecutor awaits it on the loop
            args=[name],
            trigger="date",
            run_date=datetime.fromtimestamp(when, UTC),
            id=name,
            replace_existing=True,
        )

    def cancel(self, name: str) -> None:
        if self._sched.get_job(name) is not None:
            self._sched.remove_job(name)

    def shutdown(self) -> None:
        if self._sched.running:
            self._sched.shutdown(wait=False)

    @staticmethod
    def _on_error(event: Any) -> None:
        log.error("refresh job %s raised %r", event.job_id, event.exception)


@dataclass(eq=False)
class Entry:
    """The mutable state of one credential."""

    cred: CredentialSettings
    token: Token | None = None
    serve_until: float = -math.inf  # precomputed so the hot path is one comparison
    secrets: tuple[str, ...] = field(default=(), repr=False)  # preferred first
    failed: bool = False  # permanent error: no retries until config/secret change or force
    failures: int = 0
    last_error: ErrorInfo | None = None
    refreshed_at: float | None = None
    next_refresh_at: float | None = None
    blocked_until: float = 0.0  # no on-demand attempt before this (backoff)
    issuer_retry_until: float = 0.0  # the issuer's own Retry-After
    last_forced: float = -math.inf
    inflight: asyncio.Task[BrokerError | None] | None = None
    #: Bumped when a reload changes the settings or the secrets: an attempt that began
    #: under an older generation is followed by a fresh one.
    generation: int = 0

    def state(self, now: float) -> str:
        if self.failed:
            return "failed"
        if self.inflight is not None:
            return "refreshing"
        if self.token is None:
            return "pending"
        if now >= self.serve_until:
            return "expired"
        return "stale" if self.failures else "fresh"


class Manager:
    """Keeps a servable token for every configured credential.

    The manager owns the HTTP client it is given and closes it in :meth:`close`.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        client: httpx.AsyncClient,
        clock: Clock,
        scheduler: Scheduler,
        rand: Callable[[], float] = random.random,
        notify: Callable[..., object] = lambda *lines: None,
    ) -> None:
        self.settings = settings
        self._notify = notify  # systemd.notify under systemd
        self._client = client
        self._clock = clock
        self._scheduler = scheduler
        self._rand = rand
        self.entries: dict[str, Entry] = {n: Entry(c) for n, c in settings.credentials.items()}
        self.default = settings.default_name()
        self.refreshes: Counter[tuple[str, str]] = Counter()
        self.issuer_latency: dict[str, Histogram] = {}
        self._ca_clients: dict[str, httpx.AsyncClient] = {}  # per ca_file
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_REFRESHES)
        self._reloading = asyncio.Lock()
        self._listen = settings.server.listen  # what the sockets were bound to
        self._stopped: asyncio.Future[None] | None = None  # set by stop_waiting()

    async def start(self) -> None:
        """Start the scheduler and fetch every token eagerly, without waiting for them."""
        _warn_file_modes(self.settings)
        self._stopped = asyncio.get_running_loop().create_future()
        self._scheduler.start()
        for entry in self.entries.values():
            self._begin(entry)

    async def first_round(self) -> None:
        """Wait until the eager fetch of every credential has been attempted."""
        tasks = [e.inflight for e in self.entries.values() if e.inflight is not None]
        await asyncio.gather(*(asyncio.shield(t) for t in tasks), return_exceptions=True)

    def summary(self) -> str:
        """One line for systemd's STATUS=: how many credentials are in which state."""
        now = self._clock()
        states = Counter(e.state(now) for e in self.entries.values())
        parts = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
        return f"{len(self.entries)} credential(s): {parts or 'none'}"

    def stop_waiting(self) -> None:
        """Answer every request still waiting on a refresh with TokenUnavailable.

        The server calls this on SIGTERM, before uvicorn's own shutdown deadline
        would cancel those requests (a bare 500 and a traceback in the log).
        """
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    async def _outcome(self, entry: Entry) -> BrokerError | None:
        """Wait for ``entry``'s attempt in flight and return its error, if any.

        Raises TokenUnavailable when the broker starts shutting down first.
        """
        task = entry.inflight
        assert task is not None
        if self._stopped is not None:
            # asyncio.wait never cancels what it waits for: the refresh runs on for others.
            await asyncio.wait((task, self._stopped), return_when=asyncio.FIRST_COMPLETED)
        else:
            await asyncio.wait((task,))
        if not task.done() or task.cancelled():
            name = entry.cred.name
            raise TokenUnavailable(
                name,
                f"no servable token for credential {name!r}: the broker is shutting down",
                retry_after=1.0,
            )
        return task.result()

    async def close(self) -> None:
        """Stop the scheduler, cancel refreshes in flight, close the HTTP client."""
        self._scheduler.shutdown()
        tasks = [e.inflight for e in self.entries.values() if e.inflight is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._client.aclose()
        for client in self._ca_clients.values():
            await client.aclose()

    async def reload_file(self) -> dict[str, list[str]]:
        """Re-read the config file this daemon started from, then :meth:`reload`.

        A config with errors raises ConfigError and changes nothing.
        """
        path = self.settings.path
        if path is None:
            raise ConfigError("this daemon was started without a config file: nothing to reload")
        try:
            settings = config.load(path, serving=True)
        except ConfigError as exc:
            log.error(
                "reload refused, the running configuration stays: %s",
                exc,
                extra={"event": "reload_refused"},
            )
            raise
        _warn_file_modes(settings)
        result = await self.reload(settings)
        if settings.server.listen != self._listen:
            result["restart_needed"] = [str(listen) for listen in settings.server.listen]
            log.warning("reload: listen addresses change only at a restart")
        return result

    async def reload(self, settings: Settings) -> dict[str, list[str]]:
        """Apply a new, already validated configuration without dropping any token.

        Added credentials start, removed ones stop, changed ones refresh now
        (serving their current token meanwhile). For every credential the
        secrets are read again, so a rotated secret takes effect; a secret that
        cannot be read keeps the previous one in use. A ``failed`` credential is
        retried.
        """
        async with self._reloading:  # SIGHUP twice must not interleave two reloads
            now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            self._notify("RELOADING=1", f"MONOTONIC_USEC={now_usec}")
            try:
                return await self._reload(settings)
            finally:
                self._notify("READY=1", f"STATUS={self.summary()}")

    async def _reload(self, settings: Settings) -> dict[str, list[str]]:
        old = self.entries
        result: dict[str, list[str]] = {"added": [], "removed": [], "changed": [], "unchanged": []}
        for name in old.keys() - settings.credentials.keys():
            self._stop(old[name])
            result["removed"].append(name)
        entries: dict[str, Entry] = {}
        for name, cred in settings.credentials.items():
            entry = old.get(name)
            if entry is None:
                entries[name] = Entry(cred)
                result["added"].append(name)
                continue
            changed = entry.cred != cred
            result["changed" if changed else "unchanged"].append(name)
            entry.cred = cred
            if changed:
                entry.generation += 1
            try:
                fresh = await secrets.resolve(cred.secret, name)
            except SecretError as exc:
                if not entry.secrets or changed:
                    _use_secrets(entry, ())
                    self._secret_failed(entry, exc)
                else:
                    log.warning("reload %s: %s; keeping the secret already in use", name, exc)
                entries[name] = entry
                continue
            secret_changed = fresh != entry.secrets
            _use_secrets(entry, fresh)
            entries[name] = entry
            if secret_changed and not changed:
                entry.generation += 1
            if changed or entry.failed:
                entry.failed = False
                entry.blocked_until = 0.0
                if entry.token is not None:
                    entry.serve_until = serve_until(entry.token, cred.policy)
                if entry.inflight is None:
                    self._begin(entry)
            elif secret_changed:
                log.info("reload %s: secret changed; the cached token stays in use", name)
        self.settings = settings
        self.entries = entries
        self.default = settings.default_name()
        for name in result["added"]:
            self._begin(entries[name])
        log.info(
            "reloaded: added %s, removed %s, changed %s",
            *(", ".join(result[k]) or "none" for k in ("added", "removed", "changed")),
            extra={"event": "reload"},
        )
        return result

    def _stop(self, entry: Entry) -> None:
        # A refresh in flight finishes on the detached entry; _schedule ignores it then.
        name = entry.cred.name
        self._scheduler.cancel(name)
        self.issuer_latency.pop(name, None)
        redact.drop(f"secret:{name}")
        redact.drop(f"token:{name}")

    def entry(self, name: str | None) -> Entry:
        entry = self.entries.get(name) if name is not None else None
        if entry is None:
            raise UnknownCredential(name)
        return entry

    def cached(self, name: str | None) -> Token | None:
        """The cached token of ``name`` if it is servable now, else None (never waits).

        The hot path calls this first, so a warm request costs one dict lookup,
        one clock read and one comparison, and no coroutine.
        """
        entry = self.entries.get(name)  # type: ignore[arg-type]  # None is simply absent
        if entry is not None and self._clock() < entry.serve_until:
            return entry.token
        return None

    async def token(self, name: str | None) -> Token:
        """A servable token for ``name`` (None: the default credential).

        Raises UnknownCredential, or TokenUnavailable when none can be had now.
        """
        token = self.cached(name)
        if token is not None:
            return token
        return await self._token_slow(self.entry(name))

    async def _token_slow(self, entry: Entry) -> Token:
        now = self._clock()
        if entry.inflight is None and not entry.failed and now >= entry.blocked_until:
            # Expired without a running refresh (missed job, clock jump): refresh now.
            self._begin(entry)
        if entry.inflight is not None:
            await self._outcome(entry)
        now = self._clock()
        if now < entry.serve_until:
            return entry.token  # type: ignore[return-value]
        raise self._unavailable(entry, now)

    def _unavailable(self, entry: Entry, now: float) -> TokenUnavailable:
        name = entry.cred.name
        retry_after = max(1.0, entry.blocked_until - now)
        if entry.failed:
            retry_after = max(retry_after, entry.cred.policy.force_cooldown)
        reason = f"; last error: {_describe(entry.last_error)}" if entry.last_error else ""
        detail = f"no servable token for credential {name!r} ({entry.state(now)}){reason}"
        last = entry.last_error.as_json() if entry.last_error else None
        return TokenUnavailable(name, detail, retry_after=retry_after, last_error=last)

    async def force_refresh(self, name: str) -> Entry:
        """Refresh now (e.g. after an API answered 401); return the entry when done.

        Raises RefreshCooldown if asked again within ``force_cooldown`` or while
        the issuer's Retry-After runs, and the IssuerError/SecretError of a failed
        attempt.
        """
        entry = self.entry(name)
        now = self._clock()
        if entry.inflight is None:
            wait = (
                max(entry.last_forced + entry.cred.policy.force_cooldown, entry.issuer_retry_until)
                - now
            )
            if wait > 0:
                raise RefreshCooldown(name, retry_after=math.ceil(wait))
            entry.last_forced = now
            entry.failed = False  # a forced refresh is the user's "try again"
            self._begin(entry)
        error = await self._outcome(entry)
        if error is not None:
            raise error
        return entry

    def ready(self) -> bool:
        now = self._clock()
        return all(now < e.serve_until for e in self.entries.values())

    def status(self, entry: Entry) -> dict[str, object]:
        """The status JSON of DESIGN §4: no secret, no token."""
        now = self._clock()
        token = entry.token
        return {
            "name": entry.cred.name,
            "provider": entry.cred.provider,
            "client_id": entry.cred.client_id,
            "default": entry.cred.name == self.default,  # how clients find GET /token's name
            "state": entry.state(now),
            "expires_at": rfc3339(token.expires_at if token else None),
            "refreshed_at": rfc3339(entry.refreshed_at),
            "next_refresh_at": rfc3339(entry.next_refresh_at),
            "last_error": entry.last_error.as_json() if entry.last_error else None,
        }

    # -- refresh machinery ------------------------------------------------------------

    def _begin(self, entry: Entry) -> None:
        """Start the single in-flight attempt for ``entry``."""
        entry.inflight = asyncio.get_running_loop().create_task(
            self._attempt(entry), name=f"refresh-{entry.cred.name}"
        )

    async def _scheduled(self, name: str) -> None:
        # Start the refresh and return at once: if this job waited for it, an answer that
        # came after the new token's own refresh point would find this job still running,
        # and APScheduler would drop the next one ("maximum number of running instances").
        entry = self.entries.get(name)
        if entry is None or entry.failed:  # removed by a reload, or waiting for a fix
            return
        if entry.inflight is None:
            self._begin(entry)

    async def _attempt(self, entry: Entry) -> BrokerError | None:
        generation = entry.generation
        try:
            return await self._attempt_once(entry)
        finally:
            # A reload changed this credential while the attempt was in flight: the token
            # (or error) it produced belongs to the old settings. Fetch again with the new.
            if (
                entry.generation != generation
                and self.entries.get(entry.cred.name) is entry
                and entry.inflight is None
                and not (self._stopped is not None and self._stopped.done())
            ):
                self._begin(entry)

    async def _attempt_once(self, entry: Entry) -> BrokerError | None:
        cred = entry.cred
        try:
            issued = await self._exchange(entry)
        except SecretError as exc:
            self._secret_failed(entry, exc)
            return exc
        except IssuerError as exc:
            self._failure(entry, exc)
            return exc
        except TimeoutError:
            err = IssuerError(
                "timeout", f"no complete answer within {cred.policy.timeout:g}s (refresh.timeout)"
            )
            self._failure(entry, err)
            return err
        except Exception as exc:  # never let an upstream surprise kill the daemon
            log.exception("refresh %s: unexpected error", cred.name)
            err = IssuerError("internal_error", f"{type(exc).__name__} while refreshing")
            self._failure(entry, err)
            return err
        finally:
            entry.inflight = None
        self._success(entry, issued.token, issued.debug_id)
        return None

    async def _exchange(self, entry: Entry) -> Issued:
        """Resolve the secrets if needed and ask the issuer for a token."""
        cred = entry.cred
        if not entry.secrets:
            _use_secrets(entry, await secrets.resolve(cred.secret, cred.name))
        try:
            return await self._fetch(cred, entry.secrets[0])
        except IssuerError as exc:
            if exc.error != "invalid_client" or len(entry.secrets) < 2:
                raise
        # Mid-rotation two secrets are stored and the issuer refused one: try the
        # other once, and prefer it from now on.
        issued = await self._fetch(cred, entry.secrets[1])
        _use_secrets(entry, (entry.secrets[1], entry.secrets[0]))
        log.warning("refresh %s: the issuer refused one stored secret; the other worked", cred.name)
        return issued

    async def _fetch(self, cred: CredentialSettings, secret: str) -> Issued:
        async with self._slots:
            started = self._clock()  # the timeout and issued_at start once a slot is ours
            timer = time.perf_counter()
            try:
                async with asyncio.timeout(cred.policy.timeout):
                    return await fetch_token(
                        self._client_for(cred), token_request(cred, secret), now=started
                    )
            finally:
                histogram = self.issuer_latency.get(cred.name)
                if histogram is None:
                    histogram = self.issuer_latency[cred.name] = Histogram()
                histogram.observe(time.perf_counter() - timer)

    def _client_for(self, cred: CredentialSettings) -> httpx.AsyncClient:
        """The shared client, or the one that trusts only this credential's ``ca_file``."""
        if cred.ca_file is None:
            return self._client
        client = self._ca_clients.get(cred.ca_file)
        if client is None:
            client = self._ca_clients[cred.ca_file] = issuer_client(
                cred.policy.timeout, cred.ca_file
            )
        return client

    def _success(self, entry: Entry, token: Token, debug_id: str | None) -> None:
        cred = entry.cred
        # The previous token stays valid until it expires: keep it out of logs as well.
        previous = (entry.token.access_token,) if entry.token is not None else ()
        redact.set(f"token:{cred.name}", (token.access_token, *previous))
        entry.token = token
        entry.serve_until = serve_until(token, cred.policy)
        entry.refreshed_at = token.issued_at
        entry.failures = 0
        entry.failed = False
        entry.blocked_until = 0.0
        entry.issuer_retry_until = 0.0
        when = refresh_at(token, cred.policy, self._rand)
        self._schedule(entry, when)
        self.refreshes[(cred.name, "success")] += 1
        log.info(
            "refresh %s ok: expires_at=%s token=…%s x-debug-id=%s next_refresh_at=%s",
            cred.name,
            rfc3339(token.expires_at),
            token.fingerprint,
            debug_id or "-",
            rfc3339(when),
            extra={
                "event": "refresh_ok",
                "credential": cred.name,
                "x_debug_id": debug_id,
                "expires_at": rfc3339(token.expires_at),
            },
        )

    def _failure(self, entry: Entry, exc: IssuerError) -> None:
        now = self._clock()
        if not exc.retryable:
            self._permanent(entry, exc.info(now))
            return
        entry.failures += 1
        entry.last_error = exc.info(now)
        delay = retry_delay(entry.failures, entry.cred.policy, exc.retry_after, self._rand)
        entry.blocked_until = now + delay
        entry.issuer_retry_until = now + exc.retry_after if exc.retry_after else 0.0
        self._schedule(entry, now + delay)
        self.refreshes[(entry.cred.name, "error")] += 1
        log.warning(
            "refresh %s failed (attempt %d): %s; %s; retry in %.1fs",
            entry.cred.name,
            entry.failures,
            exc.summary(),
            "serving the cached token"
            if servable(entry.token, now, entry.cred.policy)
            else "no servable token",
            delay,
            extra=_error_fields("refresh_failed", entry, exc.info(now)),
        )

    def _secret_failed(self, entry: Entry, exc: SecretError) -> None:
        info = ErrorInfo(None, "secret_unavailable", str(exc), None, self._clock())
        self._permanent(entry, info)

    def _permanent(self, entry: Entry, info: ErrorInfo) -> None:
        entry.failed = True
        entry.failures += 1
        entry.last_error = info
        entry.next_refresh_at = None
        self._scheduler.cancel(entry.cred.name)
        self.refreshes[(entry.cred.name, "error")] += 1
        log.error(
            "refresh %s failed permanently: %s; no retries until the config or secret "
            "changes or a forced refresh (POST /v1/credentials/%s/refresh)",
            entry.cred.name,
            _describe(info),
            entry.cred.name,
            extra=_error_fields("refresh_failed_permanently", entry, info),
        )

    def _schedule(self, entry: Entry, when: float) -> None:
        entry.next_refresh_at = when
        if self.entries.get(entry.cred.name) is not entry:
            return  # removed by a reload while its refresh was in flight
        self._scheduler.schedule(entry.cred.name, when, self._scheduled)


def _use_secrets(entry: Entry, values: tuple[str, ...]) -> None:
    """Hold ``values`` as the entry's secrets, and keep them out of every log line."""
    entry.secrets = values
    redact.set(f"secret:{entry.cred.name}", values)


def _error_fields(event: str, entry: Entry, info: ErrorInfo) -> dict[str, object]:
    """The structured fields of a failure event (JSON logs)."""
    return {
        "event": event,
        "credential": entry.cred.name,
        "status": info.status,
        "error": info.error,
        "x_debug_id": info.debug_id,
        "attempt": entry.failures,
    }


def _warn_file_modes(settings: Settings) -> None:
    for found in secrets.file_modes(settings):
        if found.problem:
            log.warning("%s", found.problem, extra={"event": "file_mode"})


def _describe(info: ErrorInfo | None) -> str:
    if info is None:
        return "none"
    if info.status is None and info.error == "secret_unavailable":
        return info.description
    return IssuerError(
        info.error, info.description, status=info.status, debug_id=info.debug_id
    ).summary()
