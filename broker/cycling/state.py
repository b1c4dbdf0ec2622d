"""What a secret cycle keeps between its steps, and where it keeps it.

:class:`CycleState` is written before each step takes effect (and is all a
crash leaves behind); it decides what is deleted at Adobe, so it is read
trusting nothing: a strict model, every uuid and time checked. Where it lives
is a :class:`StateStore`: a file in the state directory (:class:`StateFile`,
one broker per credential) or, for a fleet, a document in Vault beside the
secret (docs/architecture.md, "A secret cycle").
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Annotated, Literal, Protocol

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from broker.cycling.console import EARLIEST, LATEST, UUID_RE
from broker.errors import CycleError, UnsafePath
from broker.files import atomic_write, check_dir, make_private_dir, open_private, read_private

#: Steps a cycle records (None: no cycle in progress).
Step = Literal["adding", "added", "verified", "switched", "discarding"]


def _uuid(value: str) -> str:
    if not UUID_RE.match(value):
        raise ValueError("not a secret's uuid")
    return value


Uuid = Annotated[str, AfterValidator(_uuid)]
When = Annotated[float, Field(ge=EARLIEST, le=LATEST)]
Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class CycleState(BaseModel):
    """What survives a crash: written (atomically) before each step takes effect."""

    model_config = ConfigDict(strict=True, extra="forbid", validate_assignment=False)

    credential_id: str
    current: Uuid | None = None  # uuid of the secret in use, once known
    current_created_at: When | None = None  # epoch seconds, Adobe's created_at
    last_cycle_at: When | None = None
    step: Step | None = None
    old: Uuid | None = None
    new: Uuid | None = None
    before: list[Uuid] = Field(default_factory=list)  # the uuids listed at step 1
    started_at: When | None = None
    # SHA-256 of the old and new values (never the values): which one a store holds.
    old_digest: Digest | None = None
    new_digest: Digest | None = None


def digest(secret: str) -> str:
    """Which secret a store holds, without keeping it: secrets are long random strings."""
    return hashlib.sha256(secret.encode()).hexdigest()


def claimed(state: CycleState | None, credential_id: str, where: str, hint: str = "") -> CycleState:
    """``state`` as ``credential_id``'s: a fresh one for none, or for another credential's
    finished cycle (the config names another credential); CycleError for its unfinished one."""
    if state is None or (state.credential_id != credential_id and state.step is None):
        return CycleState(credential_id=credential_id)
    if state.credential_id != credential_id:
        raise CycleError(
            "error",
            f"{where} holds an unfinished cycle of credential_id {state.credential_id!r}, "
            f"not {credential_id!r}{hint}",
        )
    return state


class StateStore(Protocol):
    """Where one credential's cycle state lives, and the lock that makes one cycle run at
    a time (across processes: the daemon, ``rotate --auto``, other brokers)."""

    #: Where the state lives, in words (for messages: "remove FILE", "delete PATH").
    where: str
    #: Whether other brokers cycle the same credential through it: then only a broker
    #: with ``rotate_every`` finishes another's cycle (its policy may write).
    shared: bool
    #: After ``busy`` (another holds the lock), look again this much later.
    retry_busy: float

    def locked(self) -> AbstractAsyncContextManager[None]:
        """Hold the lock for a cycle; CycleError ``busy`` if another holds it."""
        ...

    async def load(self, credential_id: str) -> CycleState: ...

    async def save(self, state: CycleState) -> None: ...

    async def fence(self) -> float | None:
        """Before a change at Adobe: CycleError unless the lock is surely still held; the
        seconds it surely lasts (a bound for the change), or None: no bound."""
        ...

    async def adopted(self) -> None:
        """Between steps 4 and 5: return once every broker that reads the secret uses the
        new one (a store read by one broker: at once, that broker was told)."""
        ...


class StateFile:
    """``<state dir>/cycling/NAME.json`` and its lock, one per credential."""

    shared = False
    retry_busy = 5.0

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory / "cycling"
        self.path = self.directory / f"{name}.json"
        self.lock_path = self.directory / f"{name}.lock"
        self.where = str(self.path)

    async def load(self, credential_id: str) -> CycleState:
        """The state of the last or current cycle (a fresh one when there is none).

        The state decides what is deleted at Adobe, so it is read only from directories
        no other user can change, never through a symlink (:func:`broker.files.check_dir`).
        """
        try:
            check_dir(self.directory.parent)
            check_dir(self.directory)
            state = CycleState.model_validate(json.loads(read_private(self.path, 65536)))
        except FileNotFoundError:
            state = None
        except UnsafePath as exc:
            raise self._unsafe(exc) from None
        except (OSError, ValueError, TypeError, ValidationError) as exc:
            raise CycleError(
                "error",
                f"the cycling state {self.path} cannot be read ({type(exc).__name__}); check "
                "the credential's secrets in the Developer Console, then remove the file",
            ) from None
        hint = (
            ": put the old credential_id back until it finishes, or check both in the "
            "Developer Console and remove the file"
        )
        return claimed(state, credential_id, self.where, hint)

    async def save(self, state: CycleState) -> None:
        self._directories()
        atomic_write(self.path, state.model_dump_json(indent=1).encode(), 0o600)

    async def fence(self) -> None:
        return None  # an flock held by this process does not expire

    async def adopted(self) -> None:
        return None  # one broker reads this credential's store: it was told

    @asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
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
