"""Secret cycling inside the daemon: when each credential cycles, one cycle at a time.

With ``rotate_every`` a credential is cycled when its secret is that old (as
Adobe's ``created_at`` says; a little jitter spreads many brokers); an
interrupted cycle resumes soon after start, with or without ``rotate_every``;
``POST /v1/credentials/NAME/rotate`` asks for one now. Failures back off like
refreshes, and every outcome is counted, logged and shown in the status.

The cycler talks to the token lifecycle through :class:`SecretHolder` only
(use the new secret, read the store again); everything else it needs (the
issuers' clients, the scheduler, the recorder, the redaction net, where each
credential's cycle state lives) is handed in by the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeGuard

from broker.cycling.cycle import Cycle, CycleResult, OnSwitch
from broker.cycling.state import CycleState, StateStore
from broker.errors import BrokerError, CycleError, RotateCooldown
from broker.logs import Redactor
from broker.metrics import Recorder
from broker.providers import IssuedToken, IssuerClients
from broker.providers.adobe import AdobeSettings
from broker.scheduler import Scheduler
from broker.schema import CredentialSettings
from broker.stores import NO_CONTEXT, Context
from broker.tokens import Clock, retry_delay, rfc3339

log = logging.getLogger("broker.cycle")

#: A cycle asked for (POST .../rotate, `rotate --auto`) this soon after the last one is
#: refused (429): each cycle creates a secret at Adobe and deletes one for good, and a
#: caller looping on the route would churn the credential's secrets every few seconds.
#: One per ten minutes is ample for a person who reacts to a leak (one cycle ends the
#: leaked secret). Scheduled cycles (rotate_every) and the end of an interrupted cycle
#: are not held to it.
ROTATE_COOLDOWN = 600.0


class SecretHolder(Protocol):
    """What the cycler needs of the token lifecycle (:class:`broker.manager.Manager`)."""

    async def use_secret(self, name: str, secret: str, issued: IssuedToken | None) -> None:
        """Use ``secret`` from now on (and serve ``issued``, a token it minted)."""

    async def reread_secrets(self, name: str) -> None:
        """Hold exactly what the store holds now."""


#: Where one credential's cycle state lives (a file; for a fleet, Vault).
States = Callable[[str, AdobeSettings], StateStore]


@dataclass
class CycleStatus:
    """What the daemon knows of one credential's cycling (status JSON, `list`, metrics)."""

    state: CycleState | None = None
    next_at: float | None = None
    failures: int = 0
    last_error: dict[str, object] | None = None  # as the status JSON shows it
    running: bool = False

    def as_json(self, cred: AdobeSettings, now: float) -> dict[str, object]:
        state = self.state or CycleState(credential_id="")  # not read yet: nothing known
        created = state.current_created_at
        return {
            "rotate_every": cred.rotate_every,
            "secret_uuid": state.current,
            "secret_age_seconds": round(now - created) if created else None,
            "step": state.step,
            "last_cycle_at": rfc3339(state.last_cycle_at),
            "next_cycle_at": rfc3339(self.next_at),
            "running": self.running,
            "failures": self.failures,
            "last_error": self.last_error,
        }


class Cycler:
    """Runs the cycles of every credential that has the Console ids, one at a time each."""

    def __init__(
        self,
        *,
        holder: SecretHolder,
        issuers: IssuerClients,
        scheduler: Scheduler,
        states: States,
        clock: Clock,
        recorder: Recorder | None = None,
        redactor: Redactor | None = None,
        stores: Context = NO_CONTEXT,
        rand: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        first_delay: float = 1.0,
    ) -> None:
        self.status: dict[str, CycleStatus] = {}
        self._holder = holder
        self._issuers = issuers
        self._scheduler = scheduler
        self._states = states
        self._recorder = recorder or Recorder()
        self._redactor = redactor or Redactor()
        self._stores = stores
        self._clock = clock
        self._rand = rand
        self._sleep = sleep
        self._first_delay = first_delay  # after start: let the first token round go first
        # One step 1 or more at a time per credential inside the daemon (the state file's
        # flock, per open file, would refuse the daemon's own second attempt as busy).
        self._locks: dict[str, asyncio.Lock] = {}
        self._credentials: Mapping[str, CredentialSettings] = {}

    async def use(self, credentials: Mapping[str, CredentialSettings]) -> None:
        """Take the credentials of the config in force (at start and after each reload) and
        schedule every one that cycles (:meth:`_due`).

        In a fleet (a state the brokers share) only the brokers with ``rotate_every`` run
        cycles, resuming one another's; the others only follow the secret, and need not
        even be allowed to read the lease."""
        self._credentials = credentials
        now = self._clock()
        wanted = {
            n
            for n, c in credentials.items()
            if _cycling(c) and (c.rotate_every is not None or not self._states(n, c).shared)
        }
        for name in set(self.status) - wanted:
            del self.status[name]
            self._scheduler.cancel(_job(name))
        for name in wanted:
            status = self.status.setdefault(name, CycleStatus())
            cred = self._settings(name)
            if status.running:
                continue  # it reschedules itself when done
            try:  # read again: a reload may name another credential_id
                status.state = await self._states(name, cred).load(cred.credential_id or "")
            except CycleError as exc:
                log.error("cycle %s: %s", name, exc, extra={"event": "cycle_failed",
                          "credential": name, "error": exc.outcome})  # fmt: skip
                self._failed(name, exc)
                if self._states(name, cred).shared and cred.rotate_every is not None:
                    # Vault away at start: look again with backoff (a local state that
                    # cannot be used waits for the operator and a reload).
                    delay = retry_delay(status.failures, cred.policy, None, self._rand)
                    self._schedule(name, now + delay)
                continue
            if (when := self._due(status, cred, now)) is None:
                status.next_at = None
                self._scheduler.cancel(_job(name))
            else:
                self._schedule(name, when)

    async def rotate(self, name: str, *, asked: bool = True) -> CycleResult:
        """Run one cycle of ``name`` now, as asked (POST .../rotate), or finish an interrupted
        one; RotateCooldown within :data:`ROTATE_COOLDOWN` of the last cycle. Not ``asked``
        (the schedule's): no cooldown, and a cycle starts only if one is due."""
        cred = self._settings(name)
        if not cred.cycling:
            raise CycleError(
                "error",
                f"credential {name!r} has no credential_id and console_org_id: secret cycling "
                "needs both (`token-broker import` records them); reload after adding them",
            )
        status = self.status.setdefault(name, CycleStatus())
        if status.running:
            raise CycleError("busy", f"a cycle of credential {name!r} is running already")
        status.running = True  # before any await: two requests cannot both pass
        try:
            if asked:
                self._cooldown(name, await self._states(name, cred).load(cred.credential_id or ""))
            async with self._locks.setdefault(name, asyncio.Lock()):  # a survey finishes first
                return await self._run(name, cred, asked=asked)
        finally:
            status.running = False

    def _cooldown(self, name: str, state: CycleState) -> None:
        """Refuse a cycle asked for within ROTATE_COOLDOWN of the last one (its end, or the
        start of one that was undone); an interrupted cycle may always be finished."""
        if state.step is not None:
            return
        last = max((t for t in (state.last_cycle_at, state.started_at) if t is not None),
                   default=None)  # fmt: skip
        now = self._clock()
        if last is None or now >= last + ROTATE_COOLDOWN:
            return
        raise RotateCooldown(
            name,
            f"credential {name!r}: the last secret cycle ran at {rfc3339(last)}; another may be "
            f"asked for from {rfc3339(last + ROTATE_COOLDOWN)} (one per {ROTATE_COOLDOWN / 60:g} "
            "minutes on request: each cycle creates and deletes a secret at Adobe)",
            retry_after=last + ROTATE_COOLDOWN - now,
        )

    def secret_ages(self, now: float) -> dict[str, float]:
        return {
            name: now - s.state.current_created_at
            for name, s in self.status.items()
            if s.state is not None and s.state.current_created_at is not None
        }

    async def _run(self, name: str, cred: AdobeSettings, *, asked: bool) -> CycleResult:
        state_file = self._states(name, cred)

        on_switch = functools.partial(self._holder.use_secret, name)
        if_due = None if asked else (lambda state: self._is_due(state, cred))
        try:
            result = await self._cycle(name, cred, state_file, on_switch).run(if_due=if_due)
        except BrokerError as exc:  # a CycleError, or a secret store that cannot be written
            err = exc if isinstance(exc, CycleError) else CycleError("error", str(exc))
            if err.outcome == "busy":  # another process (or broker) cycles: look again later
                self._schedule(name, self._clock() + state_file.retry_busy)
            else:
                self._failed(name, err)
                await self._settle(name, state_file, cred, failed=True)
            raise err from None
        if (status := self.status.get(name)) is not None:
            status.failures, status.last_error = 0, None
        if result.outcome == "success":
            self._recorder.rotated(name, "success")
        await self._settle(name, state_file, cred, failed=False)
        return result

    def _is_due(self, state: CycleState, cred: AdobeSettings) -> bool:
        """Whether a scheduled cycle is due by ``state`` as found under the lock."""
        if cred.rotate_every is None:
            return False
        created = state.current_created_at
        return created is None or self._clock() >= created + cred.rotate_every

    def _cycle(
        self, name: str, cred: AdobeSettings, state: StateStore, on_switch: OnSwitch | None = None
    ) -> Cycle:
        """A cycle of ``name`` on the daemon's HTTP client, redaction net and clock."""
        return Cycle(
            cred,
            client=self._issuers.for_(cred),
            store=cred.secret.writer(name, self._stores),
            state=state,
            clock=self._clock,
            sleep=self._sleep,
            redactor=self._redactor,
            on_switch=on_switch,
        )

    async def _settle(
        self, name: str, state_file: StateStore, cred: AdobeSettings, *, failed: bool
    ) -> None:
        """After a cycle or survey: keep what is known, let the daemon hold exactly the
        stored secrets (the old one after success, a discarded new one after a failure, are
        gone), and schedule what comes next: the next cycle, or a retry with backoff."""
        if (status := self.status.get(name)) is None:  # removed by a reload meanwhile
            return
        with contextlib.suppress(CycleError):
            status.state = await state_file.load(cred.credential_id or "")
        await self._holder.reread_secrets(name)
        when = self._due(status, cred, self._clock())
        if failed and when is not None:
            delay = retry_delay(status.failures, cred.policy, None, self._rand)
            if status.last_error and status.last_error["outcome"] == "conflict":
                delay = max(delay, min(cred.rotate_every or 3600.0, 3600.0))  # a person must act
            when = self._clock() + delay
        if when is not None:
            self._schedule(name, when)

    async def _scheduled(self, job: str) -> None:
        name = job.removeprefix("cycle:")
        if (status := self.status.get(name)) is None or status.running:
            return
        cred = self._settings(name)
        try:
            if status.state is None:  # it could not be read before (Vault away, say)
                status.state = await self._states(name, cred).load(cred.credential_id or "")
            if status.state.step is None and status.state.current_created_at is None:
                await self._survey(name, cred)
                if (when := self._due(status, cred, self._clock())) is None:
                    return
                if status.state.current_created_at is not None and when > self._clock():
                    self._schedule(name, when)
                    return
            await self.rotate(name, asked=False)
        except CycleError as exc:
            if exc.outcome == "busy":
                log.info("cycle %s: %s; looking again later", name, exc,
                         extra={"event": "cycle_busy", "credential": name})  # fmt: skip
                return
            log.error("cycle %s: %s", name, exc, extra={"event": "cycle_failed",
                      "credential": name, "error": exc.outcome,
                      "x_request_id": exc.request_id})  # fmt: skip
            if status.state is None:  # the state could not be read: try again later
                self._failed(name, exc)
                delay = retry_delay(status.failures, cred.policy, None, self._rand)
                self._schedule(name, self._clock() + delay)
        except Exception:  # never let a surprise end the daemon's cycling for good
            log.exception("cycle %s: unexpected error", name)
            self._schedule(name, self._clock() + cred.policy.retry_max)

    async def _survey(self, name: str, cred: AdobeSettings) -> None:
        state_file = self._states(name, cred)
        try:
            async with self._locks.setdefault(name, asyncio.Lock()):
                survey = await self._cycle(name, cred, state_file).survey()
        except BrokerError as exc:
            err = exc if isinstance(exc, CycleError) else CycleError("error", str(exc))
            self._failed(name, err)
            await self._settle(name, state_file, cred, failed=True)
            raise err from None
        if name in self.status:
            self.status[name].state = survey

    def _due(self, status: CycleStatus, cred: AdobeSettings, now: float) -> float | None:
        """When the next cycle (or resume, or survey) is due; None: none is.

        An interrupted cycle is finished soon, with or without ``rotate_every`` when this
        broker alone cycles the credential; of a fleet's (a shared store) only brokers
        with ``rotate_every`` take part, since only their policy may write the secret.
        """
        state = status.state
        shared = self._states(cred.name, cred).shared
        if state is not None and state.step is not None and (cred.rotate_every or not shared):
            return now + self._first_delay  # finish the interrupted cycle soon
        if cred.rotate_every is None:
            return None
        if state is None or state.current_created_at is None:
            return now + self._first_delay  # learn the secret's age soon
        jitter = self._rand() * min(cred.rotate_every * 0.05, 3600.0)
        return max(now + self._first_delay, state.current_created_at + cred.rotate_every + jitter)

    def _schedule(self, name: str, when: float) -> None:
        if (status := self.status.get(name)) is None:  # removed by a reload while its cycle ran
            return
        status.next_at = when
        self._scheduler.schedule(_job(name), when, self._scheduled)

    def _failed(self, name: str, exc: CycleError) -> None:
        self._recorder.rotated(name, exc.outcome)
        if (status := self.status.get(name)) is None:  # removed by a reload while its cycle ran
            return
        status.failures += 1
        status.last_error = {
            "outcome": exc.outcome,
            "status": exc.status,
            # The Console's own words are quoted: keep anything secret-shaped out of them.
            "detail": self._redactor(str(exc)),
            "x_request_id": exc.request_id,
            "at": rfc3339(self._clock()),
        }

    def _settings(self, name: str) -> AdobeSettings:
        if (cred := self._credentials.get(name)) is None:
            raise CycleError("error", f"no credential named {name!r}")
        if not isinstance(cred, AdobeSettings):
            raise CycleError("error", f"credential {name!r}: secret cycling is for Adobe "
                                      "credentials (provider = \"adobe\")")  # fmt: skip
        return cred


def _cycling(cred: CredentialSettings) -> TypeGuard[AdobeSettings]:
    return isinstance(cred, AdobeSettings) and cred.cycling


def _job(name: str) -> str:
    return f"cycle:{name}"
