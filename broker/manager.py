"""The token lifecycle: single-flight refresh, retry with backoff, scheduled jobs.

The scheduler is an optimisation: :meth:`Manager.token` checks expiry on
every call, so a missed job can never serve an expired token. Time comes from
an injected clock and jobs go through a small :class:`~broker.scheduler.Scheduler`
interface, so the whole lifecycle runs under a fake clock in tests; all else it
needs from outside is handed in by the daemon (:mod:`broker.daemon`). What to do
on a reload is decided by :func:`broker.config.changes`, a pure function; what
the status JSON looks like is the API's business.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from broker import config
from broker.config import Settings
from broker.errors import (
    BrokerError,
    ErrorInfo,
    IssuerError,
    RefreshCooldown,
    SecretError,
    TokenUnavailable,
    UnknownCredential,
)
from broker.logs import Redactor
from broker.metrics import Recorder
from broker.providers import IssuedToken, IssuerClients, request_token
from broker.scheduler import Scheduler
from broker.schema import CredentialSettings
from broker.stores import NO_CONTEXT, Context
from broker.tokens import Clock, Token, refresh_at, retry_delay, rfc3339, servable, serve_until

log = logging.getLogger("broker.refresh")

#: Issuer requests in flight at once, over all credentials. With many credentials a
#: cold start would otherwise open hundreds of connections at the same moment and
#: time most of them out; the timeout clock starts only once a slot is free.
MAX_CONCURRENT_REFRESHES = 10


@dataclass(eq=False)
class Credential:
    """One credential as it lives in the daemon: its settings, token, failures and the
    refresh in flight (the settings are the config's; everything else is state)."""

    settings: CredentialSettings
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

    ``client``: the issuers' HTTP clients (or one client for all), closed in
    :meth:`close`. ``scheduler`` is started and stopped by whoever built it (the
    daemon shares it with the secret cycling). ``on_token`` hears of every new
    token (the daemon passes it on to the file outputs).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        client: httpx.AsyncClient | IssuerClients,
        clock: Clock,
        scheduler: Scheduler,
        rand: Callable[[], float] = random.random,
        recorder: Recorder | None = None,
        redactor: Redactor | None = None,
        stores: Context = NO_CONTEXT,
        on_token: Callable[[Credential], object] = lambda credential: None,
    ) -> None:
        self.settings = settings
        self.recorder = recorder or Recorder()
        # Secrets and tokens this manager holds, kept out of every log line it writes.
        self.redactor = redactor or Redactor()
        self.scheduler = scheduler
        self.issuers = client if isinstance(client, IssuerClients) else IssuerClients(client)
        self._stores = stores
        self._on_token = on_token
        self._clock = clock
        self._rand = rand
        self.credentials = {n: Credential(c) for n, c in settings.credentials.items()}
        self.default = settings.default_name()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_REFRESHES)
        self._stopped: asyncio.Future[None] | None = None  # set by stop_waiting()

    async def start(self) -> None:
        """Fetch every token eagerly, without waiting for them."""
        self._stopped = asyncio.get_running_loop().create_future()
        for credential in self.credentials.values():
            self._begin(credential)

    async def first_round(self) -> None:
        """Wait until the eager fetch of every credential has been attempted."""
        tasks = [e.inflight for e in self.credentials.values() if e.inflight is not None]
        await asyncio.gather(*(asyncio.shield(t) for t in tasks), return_exceptions=True)

    def summary(self) -> str:
        """One line for systemd's STATUS=: how many credentials are in which state."""
        now = self._clock()
        states = Counter(e.state(now) for e in self.credentials.values())
        parts = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
        return f"{len(self.credentials)} credential(s): {parts or 'none'}"

    def stop_waiting(self) -> None:
        """Answer every request still waiting on a refresh with TokenUnavailable: the server
        calls this on SIGTERM, before uvicorn's own shutdown deadline would cancel those
        requests (a bare 500 and a traceback in the log)."""
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    async def _outcome(self, credential: Credential) -> BrokerError | None:
        """Wait for ``credential``'s attempt in flight and return its error, if any;
        TokenUnavailable when the broker starts shutting down first."""
        task = credential.inflight
        assert task is not None
        stopped = () if self._stopped is None else (self._stopped,)
        # asyncio.wait never cancels what it waits for: the refresh runs on for others.
        await asyncio.wait((task, *stopped), return_when=asyncio.FIRST_COMPLETED)
        if not task.done() or task.cancelled():
            name = credential.settings.name
            raise TokenUnavailable(
                name,
                f"no servable token for credential {name!r}: the broker is shutting down",
                retry_after=1.0,
            )
        return task.result()

    async def close(self) -> None:
        """Cancel refreshes in flight, close the HTTP clients."""
        tasks = [e.inflight for e in self.credentials.values() if e.inflight is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.issuers.aclose()

    async def reload(self, settings: Settings) -> dict[str, list[str]]:
        """Apply a new, already validated configuration without dropping any token.

        Added credentials start, removed ones stop, changed ones refresh now (serving
        their current token meanwhile). Every credential's secrets are read again, so a
        rotated secret takes effect; one that cannot be read keeps the previous in use.
        A ``failed`` credential is retried. The daemon runs one reload at a time.
        """
        plan = config.changes(self.settings, settings)
        for name in plan.removed:
            # A refresh in flight finishes on the detached credential; _schedule ignores it then.
            self.scheduler.cancel(name)
            self.recorder.forget(name)
            self.redactor.drop(f"secret:{name}")
            self.redactor.drop(f"token:{name}")
        credentials: dict[str, Credential] = {}
        for name, cred in settings.credentials.items():
            if name in plan.added:
                credentials[name] = Credential(cred)
                continue
            credentials[name] = credential = self.credentials[name]
            credential.settings = cred
            if changed := name in plan.changed:
                credential.generation += 1  # an attempt in flight is followed by a fresh one
            await self._reread_secrets(credential, changed)
        self.settings = settings
        self.credentials = credentials
        self.default = settings.default_name()
        for name in plan.added:
            self._begin(credentials[name])
        log.info(
            "reloaded: added %s, removed %s, changed %s",
            *(", ".join(names) or "none" for names in (plan.added, plan.removed, plan.changed)),
            extra={"event": "reload"},
        )
        return plan.as_json()

    async def _reread_secrets(self, credential: Credential, changed: bool) -> None:
        """Read a kept credential's secrets again; refresh it if it changed or had failed."""
        cred = credential.settings
        try:
            fresh = await cred.secret.read(cred.name, self._stores)
        except SecretError as exc:
            if not credential.secrets or changed:
                self._use_secrets(credential, ())
                self._secret_failed(credential, exc)
            else:
                log.warning("reload %s: %s; keeping the secret already in use", cred.name, exc)
            return
        secret_changed = fresh != credential.secrets
        self._use_secrets(credential, fresh)
        if secret_changed and not changed:
            credential.generation += 1
        if changed or credential.failed:
            credential.failed = False
            credential.blocked_until = 0.0
            if credential.token is not None:
                credential.serve_until = serve_until(credential.token, cred.policy)
            if credential.inflight is None:
                self._begin(credential)
        elif secret_changed:
            log.info("reload %s: secret changed; the cached token stays in use", cred.name)

    def get(self, name: str | None) -> Credential:
        """The credential called ``name`` (None: the default); UnknownCredential if none."""
        if name is None or (credential := self.credentials.get(name)) is None:
            raise UnknownCredential(name)
        return credential

    def cached(self, name: str | None) -> Token | None:
        """The cached token of ``name`` if it is servable now, else None (never waits): the
        hot path calls this first, so a warm request costs one dict lookup, one clock read
        and one comparison, and no coroutine."""
        credential = self.credentials.get(name)  # type: ignore[arg-type]  # None is simply absent
        if credential is not None and self._clock() < credential.serve_until:
            return credential.token
        return None

    async def token(self, name: str | None) -> Token:
        """A servable token for ``name`` (None: the default credential); UnknownCredential,
        or TokenUnavailable when none can be had now."""
        if (token := self.cached(name)) is not None:
            return token
        credential = self.get(name)
        now = self._clock()
        if (
            credential.inflight is None
            and not credential.failed
            and now >= credential.blocked_until
        ):
            # Expired without a running refresh (missed job, clock jump): refresh now.
            self._begin(credential)
        if credential.inflight is not None:
            await self._outcome(credential)
        now = self._clock()
        if now < credential.serve_until:
            return credential.token  # type: ignore[return-value]
        name = credential.settings.name
        retry_after = max(1.0, credential.blocked_until - now)
        if credential.failed:
            retry_after = max(retry_after, credential.settings.policy.force_cooldown)
        last = credential.last_error
        reason = f"; last error: {last.summary()}" if last else ""
        detail = f"no servable token for credential {name!r} ({credential.state(now)}){reason}"
        shown = last.as_json() if last else None
        raise TokenUnavailable(name, detail, retry_after=retry_after, last_error=shown)

    async def force_refresh(self, name: str) -> Credential:
        """Refresh now (e.g. after an API answered 401); return the credential when done.
        RefreshCooldown if asked again within ``force_cooldown`` or while the issuer's
        Retry-After runs; the IssuerError/SecretError of a failed attempt."""
        credential = self.get(name)
        now = self._clock()
        if credential.inflight is None:
            cooled = credential.last_forced + credential.settings.policy.force_cooldown
            wait = max(cooled, credential.issuer_retry_until) - now
            if wait > 0:
                raise RefreshCooldown(name, retry_after=math.ceil(wait))
            credential.last_forced = now
            credential.failed = False  # a forced refresh is the user's "try again"
            self._begin(credential)
        error = await self._outcome(credential)
        if error is not None:
            raise error
        return credential

    async def use_secret(self, name: str, secret: str, issued: IssuedToken | None) -> None:
        """A secret store now holds ``secret`` as ``name``'s (a cycle switched to it): use
        it from now on, serve ``issued`` (a token it minted) if given, and return once no
        refresh with the previous secret is in flight, so that the previous one may go."""
        if (credential := self.credentials.get(name)) is None:
            return
        # The previous secret stays as the fallback until it is deleted at the issuer (an IMS
        # node that has not heard of the new one yet answers invalid_client); then the store
        # is read again (reread_secrets).
        previous = tuple(s for s in credential.secrets if s != secret)[:1]
        self._use_secrets(credential, (secret, *previous))
        credential.generation += 1  # an attempt in flight with the old secret is repeated
        if issued is not None:
            self._success(credential, issued.token, issued.debug_id)
        elif credential.inflight is None:
            self._begin(credential)
        while credential.inflight is not None:
            await asyncio.wait((credential.inflight,))

    async def reread_secrets(self, name: str) -> None:
        """Hold exactly what the store has now (a cycle ended, a new version appeared); on
        an error keep what is held."""
        if (credential := self.credentials.get(name)) is None:
            return
        try:
            fresh = await credential.settings.secret.read(name, self._stores)
        except SecretError as exc:
            log.warning("credential %s: %s; keeping the secret already in use", name, exc)
            return
        if fresh == credential.secrets:
            return
        self._use_secrets(credential, fresh)
        credential.generation += 1  # an attempt in flight with the old secret is repeated
        if credential.failed and credential.inflight is None:
            # Refused with the secret it had (a fleet's broker cut off from Vault while the
            # others cycled): a new secret is what it waited for. Try it now.
            credential.failed = False
            credential.blocked_until = 0.0
            self._begin(credential)

    def ready(self) -> bool:
        now = self._clock()
        return all(now < e.serve_until for e in self.credentials.values())

    # -- refresh machinery ------------------------------------------------------------
    def _begin(self, credential: Credential) -> None:
        """Start the single in-flight attempt for ``credential``."""
        credential.inflight = asyncio.get_running_loop().create_task(
            self._attempt(credential), name=f"refresh-{credential.settings.name}"
        )

    async def _scheduled(self, name: str) -> None:
        # Start the refresh and return at once: if this job waited for it, an answer that
        # came after the new token's own refresh point would find this job still running,
        # and APScheduler would drop the next one ("maximum number of running instances").
        credential = self.credentials.get(name)
        if credential is None or credential.failed:  # removed by a reload, or waiting for a fix
            return
        if credential.inflight is None:
            self._begin(credential)

    async def _attempt(self, credential: Credential) -> BrokerError | None:
        generation = credential.generation
        try:
            return await self._attempt_once(credential)
        finally:
            # A reload changed this credential while the attempt was in flight: the token
            # (or error) it produced belongs to the old settings. Fetch again with the new.
            if (
                credential.generation != generation
                and self.credentials.get(credential.settings.name) is credential
                and credential.inflight is None
                and not (self._stopped is not None and self._stopped.done())
            ):
                self._begin(credential)

    async def _attempt_once(self, credential: Credential) -> BrokerError | None:
        try:
            issued = await self._exchange(credential)
        except SecretError as exc:
            self._secret_failed(credential, exc)
            return exc
        except IssuerError as exc:
            self._failure(credential, exc)
            return exc
        except Exception as exc:  # never let an upstream surprise kill the daemon
            log.exception("refresh %s: unexpected error", credential.settings.name)
            err = IssuerError("internal_error", f"{type(exc).__name__} while refreshing")
            self._failure(credential, err)
            return err
        finally:
            credential.inflight = None
        self._success(credential, issued.token, issued.debug_id)
        return None

    async def _exchange(self, credential: Credential) -> IssuedToken:
        """Resolve the secrets if needed and ask the issuer for a token."""
        cred = credential.settings
        if not credential.secrets:
            self._use_secrets(credential, await cred.secret.read(cred.name, self._stores))
        held = credential.secrets
        refused: IssuerError | None = None
        for i, secret in enumerate(held):
            # Mid-rotation two (or, in Vault, three) secrets are stored and the issuer may
            # refuse one: try the others in order, and prefer the one that works.
            try:
                issued = await self._fetch(cred, secret)
            except IssuerError as exc:
                if exc.error != "invalid_client":
                    raise
                refused = refused or exc
                continue
            if i:
                self._use_secrets(credential, (secret, *(s for s in held if s != secret)))
                log.warning("refresh %s: the issuer refused a stored secret; another one "
                            "worked", cred.name)  # fmt: skip
            return issued
        assert refused is not None  # held is never empty
        # Every secret held was refused: the store may have a newer one (a cycle by
        # `token-broker rotate --auto` in another process, a file replaced by hand).
        try:
            fresh = await cred.secret.read(cred.name, self._stores)
        except SecretError:
            raise refused from None
        if fresh == held:
            raise refused
        self._use_secrets(credential, fresh)
        log.warning("refresh %s: the issuer refused the secret held; using the one stored now",
                    cred.name)  # fmt: skip
        return await self._exchange(credential)

    async def _fetch(self, cred: CredentialSettings, secret: str) -> IssuedToken:
        async with self._slots:
            started = self._clock()  # the timeout and issued_at start once a slot is ours
            timer = time.perf_counter()
            try:
                return await request_token(
                    self.issuers.for_(cred),
                    cred.token_request(secret),
                    now=started,
                    timeout=cred.policy.timeout,
                )
            finally:
                self.recorder.issuer_latency(cred.name, time.perf_counter() - timer)

    def _success(self, credential: Credential, token: Token, debug_id: str | None) -> None:
        cred = credential.settings
        # The previous token stays valid until it expires: keep it out of logs as well.
        previous = (credential.token.access_token,) if credential.token is not None else ()
        self.redactor.set(f"token:{cred.name}", (token.access_token, *previous))
        credential.token = token
        credential.serve_until = serve_until(token, cred.policy)
        credential.refreshed_at = token.issued_at
        credential.failures = 0
        credential.failed = False
        credential.blocked_until = 0.0
        credential.issuer_retry_until = 0.0
        when = refresh_at(token, cred.policy, self._rand)
        self._schedule(credential, when)
        self._on_token(credential)
        self.recorder.refreshed(cred.name, "success")
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

    def _failure(self, credential: Credential, exc: IssuerError) -> None:
        now = self._clock()
        if not exc.retryable:
            self._permanent(credential, exc.info(now))
            return
        policy = credential.settings.policy
        credential.failures += 1
        credential.last_error = exc.info(now)
        delay = retry_delay(credential.failures, policy, exc.retry_after, self._rand)
        credential.blocked_until = now + delay
        credential.issuer_retry_until = now + exc.retry_after if exc.retry_after else 0.0
        self._schedule(credential, now + delay)
        self.recorder.refreshed(credential.settings.name, "error")
        log.warning(
            "refresh %s failed (attempt %d): %s; %s; retry in %.1fs",
            credential.settings.name,
            credential.failures,
            exc.summary(),
            "serving the cached token"
            if servable(credential.token, now, policy)
            else "no servable token",
            delay,
            extra=_error_fields("refresh_failed", credential, exc.info(now)),
        )

    def _secret_failed(self, credential: Credential, exc: SecretError) -> None:
        info = ErrorInfo(None, "secret_unavailable", str(exc), None, self._clock())
        self._permanent(credential, info)

    def _permanent(self, credential: Credential, info: ErrorInfo) -> None:
        credential.failed = True
        credential.failures += 1
        credential.last_error = info
        credential.next_refresh_at = None
        self.scheduler.cancel(credential.settings.name)
        self.recorder.refreshed(credential.settings.name, "error")
        log.error(
            "refresh %s failed permanently: %s; no retries until the config or secret "
            "changes or a forced refresh (POST /v1/credentials/%s/refresh)",
            credential.settings.name,
            info.summary(),
            credential.settings.name,
            extra=_error_fields("refresh_failed_permanently", credential, info),
        )

    def _use_secrets(self, credential: Credential, values: tuple[str, ...]) -> None:
        """Hold ``values`` as the credential's secrets, and keep them out of every log line."""
        credential.secrets = values
        self.redactor.set(f"secret:{credential.settings.name}", values)

    def _schedule(self, credential: Credential, when: float) -> None:
        credential.next_refresh_at = when
        if self.credentials.get(credential.settings.name) is not credential:
            return  # removed by a reload while its refresh was in flight
        self.scheduler.schedule(credential.settings.name, when, self._scheduled)


def _error_fields(event: str, credential: Credential, info: ErrorInfo) -> dict[str, object]:
    """The structured fields of a failure event (JSON logs)."""
    return {
        "event": event,
        "credential": credential.settings.name,
        "status": info.status,
        "error": info.error,
        "x_debug_id": info.debug_id,
        "attempt": credential.failures,
    }
