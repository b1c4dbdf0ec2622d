"""Secret cycling through Adobe's I/O Management API (DESIGN §11).

A credential whose project has the I/O Management API may list, add and
delete its own client secrets. One cycle replaces the broker's secret with a
new one in five steps, each made durable (the state file, the secret store)
before the next begins, so that a crash at any point is finished or undone
by the next run:

1. a management token with the current secret; list the secrets. Two, and
   the other is not the broker's unfinished new one: stop, change nothing.
2. ``adding``: POST a new secret; store it at once beside the current one
   (keyring ``NAME#next``, file ``PATH.next``); ``added``.
3. prove it at IMS, retrying for ``rotate_verify``; ``verified``. If it never
   works: ``discarding``, DELETE it with the old secret's token, forget it.
4. switch the store to the new secret; ``switched``.
5. DELETE the old secret with a token minted by the new one; done.

:class:`Cycle` is one run (the daemon's, or ``token-broker rotate --auto``'s
when no daemon answers); :class:`Cycler` runs cycles inside the daemon: on
schedule (``rotate_every``), on request, one at a time per credential, with
backoff, status and metrics. The management token is used only here: never
served, never cached beyond one cycle, kept out of every log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import re
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from broker.config import AdobeSettings, CredentialSettings
from broker.errors import (
    BrokerError,
    CycleError,
    IssuerError,
    RotateCooldown,
    SecretError,
    UnsafePath,
)
from broker.files import (
    atomic_write,
    check_dir,
    make_private_dir,
    open_private,
    read_private,
)
from broker.logs import Redactor
from broker.providers import fetch_token, token_request
from broker.providers.base import Answer, Issued, json_object, send_bounded, text_field
from broker.providers.base import transport_failure as _transport_failure
from broker.secrets import SecretStore
from broker.tokens import Clock, retry_delay, rfc3339

if TYPE_CHECKING:
    from broker.manager import Manager

log = logging.getLogger("broker.cycle")

#: The scopes of the management token (Adobe's I/O Management API), and nothing else.
MANAGEMENT_SCOPES = (
    "AdobeID", "openid", "read_organizations", "additional_info.projectedProductContext",
    "additional_info.roles", "adobeio_api", "read_client_secret", "manage_client_secrets",
)  # fmt: skip
#: Steps a cycle records in its state file (None: no cycle in progress).
STEPS = ("adding", "added", "verified", "switched", "discarding")
#: A secret made by a lost POST is recognised as ours only if Adobe dates it after the
#: cycle began (less this much, for clock skew); anything older is someone else's.
RECOVERY_SKEW = 600.0
#: Longest pause between two attempts of step 3.
VERIFY_MAX_DELAY = 30.0
#: A cycle asked for (POST .../rotate, `rotate --auto`) this soon after the last one is
#: refused (429): each cycle creates a secret at Adobe and deletes one for good, and a
#: caller looping on the route would churn the credential's secrets every few seconds.
#: One per ten minutes is ample for a person who reacts to a leak (one cycle ends the
#: leaked secret). Scheduled cycles (rotate_every) and the end of an interrupted cycle
#: are not held to it.
ROTATE_COOLDOWN = 600.0
HOLD_HINT = "is the I/O Management API added to the credential's project in the Developer Console?"


# -- the I/O Management API ---------------------------------------------------------------


@dataclass(frozen=True)
class RemoteSecret:
    """One client secret as the Console lists it: never its value."""

    uuid: str
    created_at: float | None  # epoch seconds
    last_used_at: float | None

    def describe(self) -> str:
        created = rfc3339(self.created_at) or "unknown"
        used = rfc3339(self.last_used_at) or "never"
        return f"{self.uuid} (created {created}, last used {used})"


class Console:
    """GET, POST and DELETE on one credential's secrets, with a management token."""

    def __init__(self, client: httpx.AsyncClient, cred: AdobeSettings, timeout: float) -> None:
        self._client = client
        self._cred = cred
        self._timeout = timeout
        self.url = (
            f"{cred.console_url}/console/organizations/{cred.console_org_id}"
            f"/credentials/{cred.credential_id}/secrets"
        )

    async def list(self, token: str) -> list[RemoteSecret]:
        answer = await self._call("GET", self.url, token)
        body = json_object(answer)
        items = body.get("client_secrets") if body is not None else None
        if answer.status != 200 or not isinstance(items, list):
            raise self._failed("GET", answer)
        found = [_remote(item) for item in items]
        if any(s is None for s in found):
            raise self._failed("GET", answer, "a client_secrets entry without a uuid")
        return [s for s in found if s is not None]

    async def add(self, token: str) -> tuple[RemoteSecret, str]:
        """POST a new secret: (it, its value). The value is shown this one time only."""
        answer = await self._call("POST", self.url, token)
        body = json_object(answer)
        if answer.status not in (200, 201) or body is None:
            raise self._failed("POST", answer)
        remote, value = _remote(body), body.get("client_secret")
        if remote is None or not isinstance(value, str) or not value:
            raise self._failed("POST", answer, "no uuid or client_secret in the answer")
        return remote, value

    async def delete(self, token: str, uuid: str) -> bool:
        """DELETE a secret; False when the Console does not know it (deleted before)."""
        answer = await self._call("DELETE", f"{self.url}/{uuid}", token)
        if answer.status in (200, 204):
            return True
        if answer.status == 404:
            return False
        raise self._failed("DELETE", answer)

    async def _call(self, method: str, url: str, token: str) -> Answer:
        headers = {"Authorization": f"Bearer {token}", "x-api-key": self._cred.client_id}
        try:
            async with asyncio.timeout(self._timeout):
                answer = await send_bounded(self._client, method, url, headers)
        except TimeoutError:
            raise CycleError("error", f"Console API {method}: no answer within "
                                      f"{self._timeout:g}s") from None  # fmt: skip
        except httpx.HTTPError as exc:
            raise CycleError("error", f"Console API {method}: "
                                      f"{_transport_failure(exc, url)[1]}") from None  # fmt: skip
        except IssuerError as exc:  # an answer too long to read
            raise CycleError("error", f"Console API {method}: {exc.description}") from None
        log.info(
            "cycle %s: Console API %s secrets: HTTP %d x-request-id=%s",
            self._cred.name,
            method,
            answer.status,
            answer.headers.get("x-request-id", "-"),
            extra={"event": "console_call", "credential": self._cred.name,
                   "status": answer.status, "x_request_id": answer.headers.get("x-request-id")},
        )  # fmt: skip
        return answer

    def _failed(self, method: str, answer: Answer, why: str = "") -> CycleError:
        body = json_object(answer) or {}
        code = text_field(body.get("error_code"), 60) or text_field(body.get("error"), 60)
        message = text_field(body.get("message"), 300) or text_field(body.get("detail"), 300)
        text = f"Console API {method} answered HTTP {answer.status}"
        if why:
            text += f" ({why})"
        elif code or message:
            text += f": {code or '-'} {message}".rstrip()
        elif body == {} and answer.body:
            text += " (not JSON)"
        request_id = answer.headers.get("x-request-id")
        if request_id:
            text += f" (x-request-id {request_id})"
        if answer.status in (401, 403):
            text += f"; {HOLD_HINT}"
        return CycleError("error", text, status=answer.status, request_id=request_id)


#: What a secret's uuid may look like: it goes into a URL path (no '/', '.', '#', '%').
UUID_RE = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
#: Times outside these years are not believed (epoch seconds, 2000 to 2100).
_EARLIEST, _LATEST = 946_684_800.0, 4_102_444_800.0


def _remote(item: object) -> RemoteSecret | None:
    """A client_secrets entry, trusting nothing in it (times are epoch ms as strings)."""
    if not isinstance(item, dict):
        return None
    uuid = item.get("uuid")
    if not isinstance(uuid, str) or not UUID_RE.match(uuid):
        return None
    usages = item.get("secret_usages")
    used = [_millis(u.get("last_used_at")) for u in usages if isinstance(u, dict)] if (
        isinstance(usages, list)
    ) else []  # fmt: skip
    last_used = max((u for u in used if u is not None), default=None)
    return RemoteSecret(uuid, _millis(item.get("created_at")), last_used)


def _millis(value: object) -> float | None:
    """Epoch milliseconds (a string of digits or a number) as seconds, if believable."""
    if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) <= 16:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, int) and not 0 < value < 10**16:
        return None
    seconds = value / 1000.0
    return seconds if _EARLIEST <= seconds <= _LATEST else None  # NaN and inf fail too


# -- the state file -----------------------------------------------------------------------


@dataclass
class CycleState:
    """What survives a crash: written (0600, atomically) before each step takes effect."""

    credential_id: str
    current: str | None = None  # uuid of the secret in use, once known
    current_created_at: float | None = None  # epoch seconds, Adobe's created_at
    last_cycle_at: float | None = None
    step: str | None = None  # one of STEPS while a cycle is in progress
    old: str | None = None
    new: str | None = None
    before: list[str] = field(default_factory=list)  # the uuids listed at step 1
    started_at: float | None = None
    # SHA-256 of the old and new values (never the values): which one a store holds.
    old_digest: str | None = None
    new_digest: str | None = None


_STATE_TYPES: dict[str, tuple[type, ...]] = {
    "credential_id": (str,),
    "current": (str, type(None)), "old": (str, type(None)), "new": (str, type(None)),
    "step": (str, type(None)), "old_digest": (str, type(None)), "new_digest": (str, type(None)),
    "current_created_at": (float, int, type(None)), "last_cycle_at": (float, int, type(None)),
    "started_at": (float, int, type(None)), "before": (list,),
}  # fmt: skip


def _checked(data: object) -> CycleState:
    """The state file's content, every field checked (it decides what gets deleted)."""
    if not isinstance(data, dict) or set(data) - set(_STATE_TYPES) or "credential_id" not in data:
        raise ValueError("not a cycling state")
    for key, value in data.items():
        if not isinstance(value, _STATE_TYPES[key]) or isinstance(value, bool):
            raise ValueError(key)
        if key in ("current", "old", "new") and value is not None and not UUID_RE.match(value):
            raise ValueError(key)
        if key.endswith("_at") and value is not None and not _EARLIEST <= value <= _LATEST:
            raise ValueError(key)
    if not all(isinstance(u, str) and UUID_RE.match(u) for u in data.get("before", [])):
        raise ValueError("before")
    state = CycleState(**data)
    if state.step is not None and state.step not in STEPS:
        raise ValueError("step")
    return state


def digest(secret: str) -> str:
    """Which secret a store holds, without keeping it: secrets are long random strings."""
    return hashlib.sha256(secret.encode()).hexdigest()


class StateFile:
    """``<state dir>/cycling/NAME.json`` and its lock, one per credential."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory / "cycling"
        self.path = self.directory / f"{name}.json"
        self.lock_path = self.directory / f"{name}.lock"

    def load(self, credential_id: str) -> CycleState:
        """The state of the last or current cycle (a fresh one when there is none).

        The state decides what is deleted at Adobe, so it is read only from directories
        no other user can change, never through a symlink (:func:`broker.files.check_dir`).
        """
        try:
            check_dir(self.directory.parent)
            check_dir(self.directory)
            state = _checked(json.loads(read_private(self.path, 65536)))
        except FileNotFoundError:
            return CycleState(credential_id)
        except UnsafePath as exc:
            raise self._unsafe(exc) from None
        except (OSError, ValueError, TypeError) as exc:
            raise CycleError(
                "error",
                f"the cycling state {self.path} cannot be read ({type(exc).__name__}); check "
                "the credential's secrets in the Developer Console, then remove the file",
            ) from None
        if state.credential_id == credential_id:
            return state
        if state.step is not None:
            raise CycleError(
                "error",
                f"{self.path} holds an unfinished cycle of credential_id "
                f"{state.credential_id!r}, not {credential_id!r}: put the old credential_id "
                "back until it finishes, or check both in the Developer Console and remove "
                "the file",
            )
        return CycleState(credential_id)  # the config now names another credential

    def save(self, state: CycleState) -> None:
        self._directories()
        atomic_write(self.path, json.dumps(asdict(state), indent=1).encode(), 0o600)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive across processes (the daemon and `rotate --auto`); ``busy`` if held."""
        self._directories()
        try:
            fd = open_private(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except UnsafePath as exc:
            raise self._unsafe(exc) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CycleError("busy", "a cycle of this credential is running already") from None
            yield
        finally:
            os.close(fd)  # releases the lock

    def _directories(self) -> None:
        """The state directory and its ``cycling/``: created 0700, or refused when another
        user could change them."""
        try:
            make_private_dir(self.directory.parent)
            make_private_dir(self.directory)
        except UnsafePath as exc:
            raise self._unsafe(exc) from None

    @staticmethod
    def _unsafe(exc: UnsafePath) -> CycleError:
        return CycleError("error", f"secret cycling does not use its state: {exc}")


# -- one cycle ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CycleResult:
    outcome: str  # "success"
    old: str | None
    new: str | None
    detail: str

    def as_json(self) -> dict[str, object]:
        return asdict(self)


#: Called with the new secret and, when step 3 ran in this process, the token it minted.
OnSwitch = Callable[[str, Issued | None], Awaitable[None]]


async def _nothing(_: str, __: Issued | None) -> None:
    return None


class Cycle:
    """One cycle of one credential, resumable from its state file at any step."""

    def __init__(
        self,
        cred: AdobeSettings,
        *,
        client: httpx.AsyncClient,
        store: SecretStore,
        state: StateFile,
        clock: Clock,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        redactor: Redactor | None = None,
        on_switch: OnSwitch = _nothing,
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

    async def run(self) -> CycleResult:
        """Run a cycle, or finish (or undo) the one a crash interrupted; raise CycleError."""
        with self._state.locked():
            state = self._state.load(self.cred.credential_id or "")
            try:
                if state.step is None:
                    return await self._cycle(state)
                log.warning("cycle %s: resuming a cycle interrupted at %r", self.cred.name,
                            state.step, extra={"event": "cycle_resume"})  # fmt: skip
                return await self._resume(state)
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
        with self._state.locked():
            state = self._state.load(self.cred.credential_id or "")
            if state.step is None:
                try:
                    token = await self._management_token(await self._current())
                    self._identify(state, await self.console.list(token), strict=False)
                except (SecretError, IssuerError) as exc:
                    raise CycleError("error", str(exc)) from None
                finally:
                    self._redactor.set(f"cycle:{self.cred.name}", tuple(self._minted))
                self._state.save(state)
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
        state.step, state.old, state.new, state.new_digest = "adding", state.current, None, None
        state.old_digest = digest(current)
        state.before = [s.uuid for s in listed]
        state.started_at = self._clock()
        self._save(state, "adding")
        try:
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
        state.step, state.new, state.new_digest = "added", remote.uuid, digest(value)
        self._save(state, "added")
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
        self._save(state, "verified", step="verified")
        return await self._from_verified(state, issued)

    async def _from_verified(self, state: CycleState, issued: Issued | None) -> CycleResult:
        upcoming = await self._store.upcoming()
        if upcoming is not None and digest(upcoming) == state.new_digest:
            await self._store.promote()
        elif digest(await self._current()) != state.new_digest:  # not promoted before either
            return await self._discard(state, "the new secret is no longer stored")
        self._checkpoint("promoted")
        state.current = state.new
        self._save(state, "switched", step="switched")
        new_secret = await self._current()
        await self._on_switch(new_secret, issued)
        log.info("cycle %s: switched to secret %s", self.cred.name, state.new,
                 extra={"event": "cycle_switched"})  # fmt: skip
        return await self._from_switched(state)

    async def _from_switched(self, state: CycleState) -> CycleResult:
        stored = await self._current()
        if digest(stored) != state.new_digest:
            if digest(stored) == state.old_digest:  # switched back by hand
                return await self._discard(state, "the switch was undone by hand")
            raise CycleError(
                "error",
                f"credential {self.cred.name!r}: the stored secret is neither the old nor the "
                f"new one of the cycle in progress (step switched, old {state.old}, new "
                f"{state.new}); nothing was deleted: check the secrets in the Developer Console",
            )
        # Step 5 with a token of the new secret: should the old one be refused already,
        # its deletion still goes through; and it proves the new one for management too.
        token = await self._management_token(stored)
        old, new = state.old, state.new
        listed = {s.uuid: s for s in await self.console.list(token)}
        if new not in listed:
            raise CycleError(
                "error",
                f"credential {self.cred.name!r}: Adobe does not list the new secret {new} "
                f"although it works; nothing was deleted: check the Developer Console",
            )
        if old is not None and old != new and old in listed:
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
        done = CycleState(
            state.credential_id,
            current=new,
            current_created_at=created or self._clock(),
            last_cycle_at=self._clock(),
        )
        self._state.save(done)
        log.info("cycle %s done: secret %s replaced by %s", self.cred.name, old, new,
                 extra={"event": "cycle_done", "credential": self.cred.name})  # fmt: skip
        return CycleResult("success", old, new, f"secret {old} replaced by {new}")

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
        self._save(state, "discarding", step="discarding")
        token = await self._management_token(current)
        if state.new is not None:
            await self.console.delete(token, state.new)  # False: gone already
        self._checkpoint("discard-deleted")
        upcoming = await self._store.upcoming()
        if upcoming is not None and digest(upcoming) == state.new_digest:
            await self._store.drop_upcoming()
        new = state.new
        state.step, state.current, state.new, state.new_digest = None, state.old, None, None
        self._state.save(state)
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
        started = (state.started_at or 0.0) - RECOVERY_SKEW
        if len(made) > 1 or any(s.created_at is not None and s.created_at < started
                                for s in made):  # fmt: skip
            raise self._conflict(listed, "a secret appeared that the broker did not make")
        if not made:
            state.step, state.old = None, None
            self._state.save(state)
            return
        orphan = made[0]
        upcoming = await self._store.upcoming()
        if upcoming is not None:  # stored before the crash: carry on with it
            state.step, state.new, state.new_digest = "added", orphan.uuid, digest(upcoming)
            self._save(state, "added")
            return
        # The value is lost: nobody can use this secret. Delete it; nothing else changed.
        await self.console.delete(token, orphan.uuid)
        state.step, state.old = None, None
        self._state.save(state)
        log.warning("cycle %s: deleted secret %s, whose value the POST's answer never "
                    "delivered", self.cred.name, orphan.uuid,
                    extra={"event": "cycle_orphan_deleted"})  # fmt: skip

    async def _resume(self, state: CycleState) -> CycleResult:
        if state.step == "adding":
            await self._recover_adding(state)
            if state.step is None:  # undone (nothing had changed): this run cycles afresh
                return await self._cycle(state)
        if state.step == "added":
            return await self._from_added(state)
        if state.step == "verified":
            return await self._from_verified(state, None)
        if state.step == "switched":
            return await self._from_switched(state)
        return await self._discard(state, "an interrupted discard was finished")

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
            f"credential {self.cred.name!r}: the cycling state {self._state.path} records a "
            f"cycle at step {state.step!r} but {why}, so nothing was deleted or changed: "
            "check the credential's secrets in the Developer Console, "
            f"then remove {self._state.path}",
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
        state.current, state.current_created_at = (
            mine.uuid,
            mine.created_at or known or (self._clock()),
        )
        others = [s for s in listed if s.uuid != mine.uuid]
        if others and strict:
            raise self._conflict(listed, f"{others[0].uuid} is not the broker's")

    def _conflict(self, listed: list[RemoteSecret], why: str) -> CycleError:
        shown = "; ".join(s.describe() for s in listed)
        return CycleError(
            "conflict",
            f"credential {self.cred.name!r}: the credential has {len(listed)} client secrets "
            f"at Adobe ({shown}) and {why}; nothing was changed or deleted. Delete the secret "
            "that is not in use in the Developer Console, then cycle again",
        )

    async def _verify(self, value: str) -> tuple[Issued | None, str]:
        """Step 3: a token with the new secret, tried with backoff for ``rotate_verify``."""
        deadline = self._clock() + self.cred.rotate_verify
        delay, last = 1.0, "no attempt"
        while True:
            try:
                issued = await self._token(self.cred, value)
            except IssuerError as exc:
                last = exc.summary()
                log.info("cycle %s: the new secret does not work yet: %s", self.cred.name,
                         last, extra={"event": "cycle_verify_retry"})  # fmt: skip
            else:
                return issued, ""
            if self._clock() + delay > deadline:
                return None, f"last answer: {last}"
            await self._sleep(delay)
            delay = min(delay * 2, VERIFY_MAX_DELAY)

    async def _management_token(self, secret: str) -> str:
        management = self.cred.model_copy(update={"scopes": MANAGEMENT_SCOPES})
        try:
            issued = await self._token(management, secret)
        except IssuerError as exc:
            hint = f"; {HOLD_HINT}" if exc.error in ("invalid_scope", "unauthorized_client") else ""
            raise CycleError(
                "error", f"no management token: {exc.summary()}{hint}", status=exc.status
            ) from None
        self._minted.append(issued.token.access_token)
        self._redactor.set(f"cycle:{self.cred.name}", tuple(self._minted))
        return issued.token.access_token

    async def _token(self, cred: CredentialSettings, secret: str) -> Issued:
        try:
            async with asyncio.timeout(cred.policy.timeout):
                return await fetch_token(
                    self._client, token_request(cred, secret), now=self._clock()
                )
        except TimeoutError:
            raise IssuerError("timeout", f"no answer within {cred.policy.timeout:g}s") from None

    async def _current(self) -> str:
        secret = await self._store.current()
        if secret is None:
            raise SecretError(
                f"credential {self.cred.name!r}: no current secret in {self._store.ref.describe()}"
            )
        return secret

    def _save(self, state: CycleState, point: str, *, step: str | None = None) -> None:
        if step is not None:
            state.step = step
        self._state.save(state)
        self._checkpoint(point)


# -- in the daemon ---------------------------------------------------------------------------


@dataclass
class CycleStatus:
    """What the daemon knows of one credential's cycling (status JSON, `list`, metrics)."""

    state: CycleState | None = None
    next_at: float | None = None
    failures: int = 0
    last_error: dict[str, object] | None = None  # as the status JSON shows it
    running: bool = False

    def as_json(self, cred: AdobeSettings, now: float) -> dict[str, object]:
        created = self.state.current_created_at if self.state else None
        return {
            "rotate_every": cred.rotate_every,
            "secret_uuid": self.state.current if self.state else None,
            "secret_age_seconds": round(now - created) if created else None,
            "step": self.state.step if self.state else None,
            "last_cycle_at": rfc3339(self.state.last_cycle_at if self.state else None),
            "next_cycle_at": rfc3339(self.next_at),
            "running": self.running,
            "failures": self.failures,
            "last_error": self.last_error,
        }


class Cycler:
    """Runs the cycles of every credential that has the Console ids, inside the daemon.

    With ``rotate_every`` a credential is cycled when its secret is that old
    (as Adobe's ``created_at`` says; a little jitter spreads many brokers) and
    an interrupted cycle resumes soon after start; ``token-broker rotate --auto``
    asks for a cycle now (:meth:`rotate`). One cycle per credential at a time.
    """

    def __init__(
        self,
        manager: Manager,
        directory: Path,
        *,
        clock: Clock,
        rand: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        first_delay: float = 1.0,
    ) -> None:
        self.manager = manager
        self.directory = directory
        self.status: dict[str, CycleStatus] = {}
        self._clock = clock
        self._rand = rand
        self._sleep = sleep
        self._first_delay = first_delay  # after start: let the first token round go first
        self._locks: dict[str, asyncio.Lock] = {}

    def start(self) -> None:
        """Schedule every cycling credential (at start and after each reload).

        A credential with ``rotate_every`` at the age of its secret; an interrupted
        cycle soon, with or without ``rotate_every``: it must not stay half done.
        """
        now = self._clock()
        wanted = {n for n, c in self.manager.settings.credentials.items() if _cycling(c)}
        for name in list(self.status):
            if name not in wanted:
                del self.status[name]
                self.manager.scheduler.cancel(_job(name))
        for name in wanted:
            status = self.status.setdefault(name, CycleStatus())
            cred = self._settings(name)
            if status.running:
                continue  # it reschedules itself when done
            try:  # read again: a reload may name another credential_id
                status.state = StateFile(self.directory, name).load(cred.credential_id or "")
            except CycleError as exc:
                log.error("cycle %s: %s", name, exc, extra={"event": "cycle_failed",
                          "credential": name, "error": exc.outcome})  # fmt: skip
                self._failed(name, exc)
                continue
            when = self._due(status, cred, now)
            if when is None:
                status.next_at = None
                self.manager.scheduler.cancel(_job(name))
            else:
                self._schedule(name, when)

    async def rotate(self, name: str) -> CycleResult:
        """Run one cycle of ``name`` now, as asked (POST .../rotate), or finish an interrupted
        one; RotateCooldown within :data:`ROTATE_COOLDOWN` of the last cycle."""
        return await self._rotate(name, asked=True)

    async def _rotate(self, name: str, *, asked: bool = False) -> CycleResult:
        cred = self._settings(name)
        if not _cycling(cred):
            raise CycleError(
                "error",
                f"credential {name!r} has no credential_id and console_org_id: secret cycling "
                "needs both (`token-broker import` records them); reload after adding them",
            )
        status = self.status.setdefault(name, CycleStatus())
        if status.running:
            raise CycleError("busy", f"a cycle of credential {name!r} is running already")
        if asked:  # no await between this check and `running`: two requests cannot both pass
            self._cooldown(name, StateFile(self.directory, name).load(cred.credential_id or ""))
        status.running = True
        try:
            async with self._lock(name):  # a survey in progress finishes first
                return await self._run(name, cred)
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
            f"credential {name!r}: the last secret cycle ran at {rfc3339(last)}; another may "
            f"be asked for from {rfc3339(last + ROTATE_COOLDOWN)} (one per "
            f"{ROTATE_COOLDOWN / 60:g} minutes on request: each cycle creates and deletes a "
            "secret at Adobe)",
            retry_after=last + ROTATE_COOLDOWN - now,
        )

    def _lock(self, name: str) -> asyncio.Lock:
        """One step-1-or-more at a time per credential inside the daemon (the state file's
        flock, per open file, would refuse the daemon's own second attempt as busy)."""
        return self._locks.setdefault(name, asyncio.Lock())

    def secret_ages(self, now: float) -> dict[str, float]:
        return {
            name: now - s.state.current_created_at
            for name, s in self.status.items()
            if s.state is not None and s.state.current_created_at is not None
        }

    async def _run(self, name: str, cred: AdobeSettings) -> CycleResult:
        state_file = StateFile(self.directory, name)

        async def on_switch(secret: str, issued: Issued | None) -> None:
            await self.manager.switch_secret(name, secret, issued)

        try:
            result = await self._cycle(name, cred, state_file, on_switch).run()
        except BrokerError as exc:  # a CycleError, or a secret store that cannot be written
            err = exc if isinstance(exc, CycleError) else CycleError("error", str(exc))
            if err.outcome != "busy":
                self._failed(name, err)
                await self._settle(name, state_file, cred, failed=True)
            raise err from None
        if (status := self.status.get(name)) is not None:
            status.failures, status.last_error = 0, None
        self.manager.recorder.rotated(name, "success")
        await self._settle(name, state_file, cred, failed=False)
        return result

    def _cycle(
        self, name: str, cred: AdobeSettings, state_file: StateFile, on_switch: OnSwitch = _nothing
    ) -> Cycle:
        """A cycle of ``name`` on the daemon's HTTP client, redaction net and clock."""
        return Cycle(
            cred,
            client=self.manager.client_for(cred),
            store=SecretStore.of(cred.secret, name),
            state=state_file,
            clock=self._clock,
            sleep=self._sleep,
            redactor=self.manager.redactor,
            on_switch=on_switch,
        )

    async def _settle(
        self, name: str, state_file: StateFile, cred: AdobeSettings, *, failed: bool
    ) -> None:
        """After a cycle or survey: keep what is known, let the daemon hold exactly the
        stored secrets (the old one after success, a discarded new one after a failure, are
        gone), and schedule what comes next: the next cycle, or a retry with backoff."""
        status = self.status.get(name)
        if status is None:  # removed by a reload meanwhile
            return
        with contextlib.suppress(CycleError):
            status.state = state_file.load(cred.credential_id or "")
        await self.manager.reread_secrets(name)
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
        if name not in self.status or self.status[name].running:
            return
        cred = self._settings(name)
        status = self.status[name]
        try:
            if (
                status.state is not None
                and status.state.step is None
                and (status.state.current_created_at is None)
            ):
                await self._survey(name, cred)
                when = self._due(status, cred, self._clock())
                if when is None:
                    return
                known = status.state is not None and status.state.current_created_at is not None
                if known and when > self._clock():
                    self._schedule(name, when)
                    return
            await self._rotate(name)
        except CycleError as exc:
            log.error("cycle %s: %s", name, exc, extra={"event": "cycle_failed",
                      "credential": name, "error": exc.outcome,
                      "x_request_id": exc.request_id})  # fmt: skip
        except Exception:  # never let a surprise end the daemon's cycling for good
            log.exception("cycle %s: unexpected error", name)
            self._schedule(name, self._clock() + cred.policy.retry_max)

    async def _survey(self, name: str, cred: AdobeSettings) -> None:
        state_file = StateFile(self.directory, name)
        try:
            async with self._lock(name):
                survey = await self._cycle(name, cred, state_file).survey()
        except BrokerError as exc:
            err = exc if isinstance(exc, CycleError) else CycleError("error", str(exc))
            self._failed(name, err)
            await self._settle(name, state_file, cred, failed=True)
            raise err from None
        if name in self.status:
            self.status[name].state = survey

    def _due(self, status: CycleStatus, cred: AdobeSettings, now: float) -> float | None:
        """When the next cycle (or resume, or survey) is due; None: none is."""
        state = status.state
        if state is not None and state.step is not None:
            return now + self._first_delay  # finish the interrupted cycle soon
        if cred.rotate_every is None:
            return None
        if state is None or state.current_created_at is None:
            return now + self._first_delay  # learn the secret's age soon
        jitter = self._rand() * min(cred.rotate_every * 0.05, 3600.0)
        return max(now + self._first_delay, state.current_created_at + cred.rotate_every + jitter)

    def _schedule(self, name: str, when: float) -> None:
        status = self.status.get(name)
        if status is None:  # removed by a reload while its cycle ran
            return
        status.next_at = when
        self.manager.scheduler.schedule(_job(name), when, self._scheduled)

    def _failed(self, name: str, exc: CycleError) -> None:
        self.manager.recorder.rotated(name, exc.outcome)
        status = self.status.get(name)
        if status is None:  # removed by a reload while its cycle ran
            return
        status.failures += 1
        status.last_error = {
            "outcome": exc.outcome,
            "status": exc.status,
            # The Console's own words are quoted: keep anything secret-shaped out of them.
            "detail": self.manager.redactor(str(exc)),
            "x_request_id": exc.request_id,
            "at": rfc3339(self._clock()),
        }

    def _settings(self, name: str) -> AdobeSettings:
        cred = self.manager.get(name).settings
        if not isinstance(cred, AdobeSettings):
            raise CycleError("error", f"credential {name!r}: secret cycling is for Adobe "
                                      "credentials (provider = \"adobe\")")  # fmt: skip
        return cred


def _cycling(cred: CredentialSettings) -> bool:
    return isinstance(cred, AdobeSettings) and cred.cycling


def _job(name: str) -> str:
    return f"cycle:{name}"
