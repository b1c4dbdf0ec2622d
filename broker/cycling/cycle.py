"""One secret cycle of one credential, resumable at any step.

Five steps, each made durable (the state, the secret store) before the next
begins, so that a crash at any point is finished or undone by the next run
(docs/architecture.md, "A secret cycle"):

1. a management token with the current secret; list the secrets. Two, and
   the other is not the broker's unfinished new one: stop, change nothing.
2. ``adding``: POST a new secret; store it at once beside the current one
   (:meth:`~broker.stores.SecretWriter.put_upcoming`); ``added``.
3. prove it at IMS, retrying for ``rotate_verify``; ``verified``. If it never
   works: ``discarding``, DELETE it with the old secret's token, forget it.
4. switch the store to the new secret; ``switched``; wait until every broker
   that reads the store uses it (:meth:`~broker.stores.SecretWriter.adopted`).
5. DELETE the old secret with a token minted by the new one; done.

A :class:`Cycle` is one run, the daemon's (:mod:`broker.cycling.cycler`) or
``token-broker rotate --auto``'s when no daemon answers. The management token is
used only here: never served, never cached beyond one cycle, kept out of every
log line.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

import httpx

from broker.cycling.console import HOLD_HINT, Console, RemoteSecret
from broker.cycling.state import CycleState, StateStore, Step, digest
from broker.errors import CycleError, IssuerError, SecretError
from broker.logs import Redactor
from broker.providers import IssuedToken, request_token
from broker.providers.adobe import AdobeSettings
from broker.schema import CredentialSettings
from broker.stores import SecretWriter
from broker.tokens import Clock

log = logging.getLogger("broker.cycle")

#: A secret made by a lost POST is recognised as ours only if Adobe dates it after the
#: cycle began (less this much, for clock skew); anything older is someone else's.
RECOVERY_SKEW = 600.0
#: Longest pause between two attempts of step 3.
VERIFY_MAX_DELAY = 30.0


@dataclass(frozen=True)
class CycleResult:
    outcome: str  # "success"
    old: str | None
    new: str | None
    detail: str

    def as_json(self) -> dict[str, object]:
        return asdict(self)


#: Called with the new secret and, when step 3 ran in this process, the token it minted.
OnSwitch = Callable[[str, IssuedToken | None], Awaitable[None]]


class Cycle:
    """One cycle of one credential, resumable from its state file at any step."""

    def __init__(
        self,
        cred: AdobeSettings,
        *,
        client: httpx.AsyncClient,
        store: SecretWriter,
        state: StateStore,
        clock: Clock,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        redactor: Redactor | None = None,
        on_switch: OnSwitch | None = None,
        checkpoint: Callable[[str], None] = lambda point: None,
    ) -> None:
        self.cred = cred
        self.console = Console(client, cred, cred.policy.timeout)
        self._client = client
        self._store = store
        self._state = state
        self._clock = clock
        self._sleep = sleep
        self._redactor = redactor or Redactor()
        self._on_switch = on_switch
        # Tests crash the cycle here (every step boundary): a stand-in for kill -9.
        self._checkpoint = checkpoint
        self._minted: list[str] = []  # management tokens and the new secret, kept out of logs

    async def run(self, *, if_due: Callable[[CycleState], bool] | None = None) -> CycleResult:
        """Run a cycle, or finish (or undo) the one a crash interrupted; raise CycleError.

        ``if_due``: a scheduled cycle starts only if the state found under the lock says
        one is due (a broker of a fleet may have cycled meanwhile): else ``not_due``.
        """
        async with self._state.locked():
            state = await self._state.load(self.cred.credential_id or "")
            try:
                if state.step is None and if_due is not None and not if_due(state):
                    return CycleResult("not_due", state.current, None, "no cycle is due")
                if state.step is not None:
                    log.warning("cycle %s: resuming a cycle interrupted at %r", self.cred.name,
                                state.step, extra={"event": "cycle_resume"})  # fmt: skip
                if state.step == "adding":
                    await self._recover_adding(state)
                if state.step is None:  # none, or one undone (nothing had changed): cycle afresh
                    return await self._cycle(state)
                if state.step == "added":
                    return await self._from_added(state)
                if state.step == "verified":
                    return await self._from_verified(state, None)
                if state.step == "switched":
                    return await self._from_switched(state)
                return await self._discard(state, "an interrupted discard was finished")
            except (SecretError, IssuerError) as exc:
                raise CycleError("error", str(exc)) from None
            except (CycleError, asyncio.CancelledError):
                raise
            except Exception as exc:  # a surprise must not leave the daemon's cycling broken
                log.exception("cycle %s: unexpected error", self.cred.name)
                raise CycleError("error", f"unexpected {type(exc).__name__}; see the log") from None
            finally:
                self._redactor.set(f"cycle:{self.cred.name}", tuple(self._minted))

    async def survey(self) -> CycleState:
        """Learn which secret is ours and how old it is (step 1 only); change nothing."""
        async with self._state.locked():
            state = await self._state.load(self.cred.credential_id or "")
            if state.step is None:
                try:
                    token = await self._management_token(await self._current())
                    self._identify(state, await self.console.list(token), strict=False)
                except (SecretError, IssuerError) as exc:
                    raise CycleError("error", str(exc)) from None
                finally:
                    self._redactor.set(f"cycle:{self.cred.name}", tuple(self._minted))
                await self._state.save(state)
            return state

    # -- the steps ------------------------------------------------------------------------

    async def _cycle(self, state: CycleState) -> CycleResult:
        if await self._store.upcoming() is not None:
            raise CycleError(
                "error",
                f"credential {self.cred.name!r}: a new secret is stored beside the current "
                f"one ({self._store.ref.describe()}, the #next/.next item) but no cycle of "
                "the broker is in progress: a `token-broker rotate` by hand is under way; "
                "finish or abort it first",
            )
        current = await self._current()
        token = await self._management_token(current)
        listed = await self.console.list(token)
        self._identify(state, listed)
        # Step 2: recorded before the POST, so that a crash after it finds what it made.
        state.old, state.new, state.new_digest = state.current, None, None
        state.old_digest = digest(current)
        state.before = [s.uuid for s in listed]
        state.started_at = self._clock()
        await self._save(state, "adding")
        try:
            await self._fenced()
            remote, value = await self.console.add(token)
        except CycleError as exc:
            log.warning("cycle %s: %s; looking for what the POST may have created",
                        self.cred.name, exc, extra={"event": "cycle_post_failed"})  # fmt: skip
            await self._recover_adding(state, token)
            raise
        self._minted.append(value)
        self._redactor.set(f"cycle:{self.cred.name}", tuple(self._minted))
        self._checkpoint("posted")  # the value exists only in this process's memory now
        await self._store.put_upcoming(value)
        self._checkpoint("stored")
        state.new, state.new_digest = remote.uuid, digest(value)
        await self._save(state, "added")
        log.info("cycle %s: new secret %s stored beside the current one", self.cred.name,
                 remote.uuid, extra={"event": "cycle_added"})  # fmt: skip
        return await self._from_added(state)

    async def _from_added(self, state: CycleState) -> CycleResult:
        value = await self._store.upcoming()
        if value is None or digest(value) != state.new_digest:
            # Removed (`rotate --abort`) or replaced by hand: Adobe's copy must go too.
            return await self._discard(state, "the new secret is no longer stored")
        issued, why = await self._verify(value)
        if issued is None:
            return await self._discard(state, why)
        await self._save(state, "verified")
        return await self._from_verified(state, issued)

    async def _from_verified(self, state: CycleState, issued: IssuedToken | None) -> CycleResult:
        upcoming = await self._store.upcoming()
        if upcoming is not None and digest(upcoming) == state.new_digest:
            await self._store.promote()
        elif digest(await self._current()) != state.new_digest:  # not promoted before either
            return await self._discard(state, "the new secret is no longer stored")
        self._checkpoint("promoted")
        state.current = state.new
        await self._save(state, "switched")
        secret = await self._current()
        if self._on_switch is not None:
            await self._on_switch(secret, issued)
        log.info("cycle %s: switched to secret %s", self.cred.name, state.new,
                 extra={"event": "cycle_switched"})  # fmt: skip
        return await self._from_switched(state)

    async def _from_switched(self, state: CycleState) -> CycleResult:
        if (undone := await self._switched_back(state)) is not None:
            return undone
        # Every broker that reads this store uses the new secret before the old one goes.
        await self._state.adopted()
        # That wait may last rotate_grace: a switch undone meanwhile keeps the old secret.
        if (undone := await self._switched_back(state)) is not None:
            return undone
        # Step 5 with a token of the new secret: should the old one be refused already,
        # its deletion still goes through; and it proves the new one for management too.
        token = await self._management_token(await self._current())
        old, new = state.old, state.new
        listed = {s.uuid: s for s in await self.console.list(token)}
        if new not in listed:
            raise CycleError(
                "error",
                f"credential {self.cred.name!r}: Adobe does not list the new secret {new} "
                f"although it works; nothing was deleted: check the Developer Console",
            )
        if old is not None and old != new and old in listed:
            await self._fenced()
            await self.console.delete(token, old)
            self._checkpoint("deleted")
            listed = {s.uuid: s for s in await self.console.list(token)}
            if old in listed:  # a DELETE that said 404, or did not take: try again later
                raise CycleError(
                    "error",
                    f"credential {self.cred.name!r}: the old secret {old} is still listed after "
                    "its DELETE; the cycle finishes at the next attempt",
                )
        else:
            self._checkpoint("deleted")
        created = listed[new].created_at if new in listed else None
        await self._store.finish()
        done = CycleState(
            credential_id=state.credential_id,
            current=new,
            current_created_at=created or self._clock(),
            last_cycle_at=self._clock(),
        )
        await self._state.save(done)
        log.info("cycle %s done: secret %s replaced by %s", self.cred.name, old, new,
                 extra={"event": "cycle_done", "credential": self.cred.name})  # fmt: skip
        return CycleResult("success", old, new, f"secret {old} replaced by {new}")

    async def _switched_back(self, state: CycleState) -> CycleResult | None:
        """None while the store holds the new secret; the discarded cycle's result once it
        was switched back by hand; CycleError for a secret that is neither."""
        stored = digest(await self._current())
        if stored == state.new_digest:
            return None
        if stored == state.old_digest:
            return await self._discard(state, "the switch was undone by hand")
        raise CycleError(
            "error",
            f"credential {self.cred.name!r}: the stored secret is neither the old nor the "
            f"new one of the cycle in progress (step switched, old {state.old}, new "
            f"{state.new}); nothing was deleted: check the secrets in the Developer Console",
        )

    async def _discard(self, state: CycleState, why: str) -> CycleResult:
        """Delete the new secret at Adobe with a token of the stored (old) one; keep the old."""
        current = await self._current()
        self._prove(state, current)
        if state.new is None or state.new_digest is None or state.new == state.old:
            raise self._unproven(state, "does not record the new secret's uuid and digest")
        if digest(current) == state.new_digest:
            raise CycleError(  # never delete the secret that is stored and in use
                "error",
                f"credential {self.cred.name!r}: the new secret {state.new} is the stored one; "
                "not deleting it: check the Developer Console and the state file",
            )
        await self._save(state, "discarding")
        token = await self._management_token(current)
        await self._fenced()
        await self.console.delete(token, state.new)  # False: gone already
        self._checkpoint("discard-deleted")
        upcoming = await self._store.upcoming()
        if upcoming is not None and digest(upcoming) == state.new_digest:
            await self._store.drop_upcoming()
        new = state.new
        state.step, state.current, state.new, state.new_digest = None, state.old, None, None
        await self._state.save(state)
        raise CycleError(
            "discarded",
            f"credential {self.cred.name!r}: the new secret {new} did not work at IMS within "
            f"rotate_verify ({self.cred.rotate_verify:g}s) or was no longer stored: deleted it "
            f"at Adobe; the current secret stays in use ({why})",
        )

    async def _recover_adding(self, state: CycleState, token: str | None = None) -> None:
        """After a POST whose answer was lost or not stored: adopt or delete what it made.

        Only what was not listed before the POST can be its secret, and only a state that
        proves it is this broker's (:meth:`_prove`) says what was listed before.
        """
        current = await self._current()
        self._prove(state, current)
        if state.started_at is None or state.old not in state.before:
            raise self._unproven(state, "does not record which secrets were listed before the POST")
        token = token or await self._management_token(current)
        listed = await self.console.list(token)
        made = [s for s in listed if s.uuid not in state.before]
        started = state.started_at - RECOVERY_SKEW
        if len(made) > 1 or any(s.created_at is not None and s.created_at < started
                                for s in made):  # fmt: skip
            raise self._conflict(listed, "a secret appeared that the broker did not make")
        if not made:
            state.step, state.old = None, None
            await self._state.save(state)
            return
        orphan = made[0]
        upcoming = await self._store.upcoming()
        if upcoming is not None:  # stored before the crash: carry on with it
            state.new, state.new_digest = orphan.uuid, digest(upcoming)
            await self._save(state, "added")
            return
        # The value is lost: nobody can use this secret. Delete it; nothing else changed.
        await self._fenced()
        await self.console.delete(token, orphan.uuid)
        state.step, state.old = None, None
        await self._state.save(state)
        log.warning("cycle %s: deleted secret %s, whose value the POST's answer never "
                    "delivered", self.cred.name, orphan.uuid,
                    extra={"event": "cycle_orphan_deleted"})  # fmt: skip

    # -- helpers --------------------------------------------------------------------------

    def _prove(self, state: CycleState, current: str) -> None:
        """Raise unless ``state`` was written by this broker for the secret it stores now.

        Recovery deletes secrets at Adobe on the word of the state file: it must name
        the old secret (uuid and SHA-256 digest) and the store must still hold that
        secret. Nobody can write that digest without the secret itself, so a state
        planted or corrupted is never acted on, and the stored secret, or the one it
        held before, is never deleted because a file said so.
        """
        if state.old is None or state.old_digest is None:
            raise self._unproven(state, "does not record the old secret's uuid and digest")
        if digest(current) != state.old_digest:
            raise self._unproven(state, "was not written for the secret stored now")

    def _unproven(self, state: CycleState, why: str) -> CycleError:
        return CycleError(
            "error",
            f"credential {self.cred.name!r}: the cycling state {self._state.where} records a "
            f"cycle at step {state.step!r} but {why}, so nothing was deleted or changed: check "
            f"the credential's secrets in the Developer Console, then remove {self._state.where}",
        )

    def _identify(self, state: CycleState, listed: list[RemoteSecret], strict: bool = True) -> None:
        """Find the broker's own secret among ``listed``; refuse when there is another."""
        by_uuid = {s.uuid: s for s in listed}
        if state.current in by_uuid:
            mine = by_uuid[state.current]
        elif len(listed) == 1:
            mine = listed[0]  # the management token proved our secret is there: this is it
        else:
            if not strict:
                return
            raise self._conflict(listed, "the broker cannot tell which one it holds")
        # No believable created_at: count the age from now, never cycle for want of it.
        known = state.current_created_at if state.current == mine.uuid else None
        state.current = mine.uuid
        state.current_created_at = mine.created_at or known or self._clock()
        if strict and (others := [s for s in listed if s.uuid != mine.uuid]):
            raise self._conflict(listed, f"{others[0].uuid} is not the broker's")

    def _conflict(self, listed: list[RemoteSecret], why: str) -> CycleError:
        shown = "; ".join(s.describe() for s in listed)
        return CycleError(
            "conflict",
            f"credential {self.cred.name!r}: the credential has {len(listed)} client secrets "
            f"at Adobe ({shown}) and {why}; nothing was changed or deleted. Delete the secret "
            "that is not in use in the Developer Console, then cycle again",
        )

    async def _verify(self, value: str) -> tuple[IssuedToken | None, str]:
        """Step 3: a token with the new secret, tried with backoff for ``rotate_verify``."""
        deadline = self._clock() + self.cred.rotate_verify
        delay = 1.0
        while True:
            try:
                return await self._token(self.cred, value), ""
            except IssuerError as exc:
                last = exc.summary()
                log.info("cycle %s: the new secret does not work yet: %s", self.cred.name,
                         last, extra={"event": "cycle_verify_retry"})  # fmt: skip
            if self._clock() + delay > deadline:
                return None, f"last answer: {last}"
            await self._sleep(delay)
            delay = min(delay * 2, VERIFY_MAX_DELAY)

    async def _management_token(self, secret: str) -> str:
        try:
            issued = await self._token(self.cred.for_management(), secret)
        except IssuerError as exc:
            hint = f"; {HOLD_HINT}" if exc.error in ("invalid_scope", "unauthorized_client") else ""
            raise CycleError(
                "error", f"no management token: {exc.summary()}{hint}", status=exc.status
            ) from None
        self._minted.append(issued.token.access_token)
        self._redactor.set(f"cycle:{self.cred.name}", tuple(self._minted))
        return issued.token.access_token

    async def _token(self, cred: CredentialSettings, secret: str) -> IssuedToken:
        return await request_token(
            self._client, cred.token_request(secret), now=self._clock(),
            timeout=cred.policy.timeout,
        )  # fmt: skip

    async def _fenced(self) -> None:
        """Before a change at Adobe: the lock is surely held, and the change must end
        before it could lapse (a fleet's lease in Vault expires)."""
        bound = await self._state.fence()
        timeout = self.cred.policy.timeout
        self.console.timeout = timeout if bound is None else min(timeout, bound)

    async def _current(self) -> str:
        secret = await self._store.current()
        if secret is None:
            raise SecretError(
                f"credential {self.cred.name!r}: no current secret in {self._store.ref.describe()}"
            )
        return secret

    async def _save(self, state: CycleState, step: Step) -> None:
        """Record ``step``; the checkpoint of the same name follows once it is durable."""
        state.step = step
        await self._state.save(state)
        self._checkpoint(step)
