"""A cycle's state and lock in Vault: one broker of a fleet cycles at a time, any may
finish what another began (docs/architecture.md, "One secret for a fleet").

The lease is a document beside the secret, ``PATH/cycle``: who holds it and the
cycle's state, every change written with check-and-set on the version the
holder wrote last. The holder rewrites it every ``poll`` from a task of its
own; it expires ``3 × poll`` after its last write, judged by Vault's clock (the
time Vault stamps on a write: a contender's "now" is the time of its own report,
written just before). Before each change at Adobe the holder makes sure it still
holds the lease and bounds the change's time by what the lease surely has
left, so a holder cut off from Vault changes nothing there once another may
have taken over. Between a cycle's steps 4 and 5 it waits for the other brokers
(:meth:`VaultState.adopted`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from pydantic import ValidationError

from broker.cycling.state import CycleState, claimed
from broker.errors import CycleError
from broker.stores.vault import VaultRef, VaultSession
from broker.vault import CasConflict, VaultError

log = logging.getLogger("broker.cycle")

#: A lease, and a report, count as alive this many polls after their last write: the
#: writer's ``poll`` as it recorded it, or the reader's if longer (brokers of a fleet may
#: be set differently), at most :data:`LONGEST_POLL`.
ALIVE_POLLS = 3
LONGEST_POLL = 3600.0
#: The name of a broker's report: its random id (:class:`~broker.stores.VaultSession`).
#: Any other key under ``brokers/`` is not a broker's, and is not judged.
BROKER_ID = re.compile(r"[0-9a-f]{16}")


class VaultState:
    """:class:`~broker.cycling.state.StateStore` in Vault, shared by every broker of the
    credential: the lease and the cycle's state in ``PATH/cycle``."""

    shared = True

    def __init__(
        self,
        name: str,
        ref: VaultRef,
        session: VaultSession,
        *,
        grace: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.name = name
        self.ref = ref
        self.session = session
        self.poll = session.poll
        self.retry_busy = session.poll  # look again once the holder has written again
        self.grace = grace if grace is not None else 10 * session.poll
        self._path = ref.cycle_path
        self.where = f"{ref.mount}/{self._path} in {session.vault.address}"
        self._monotonic = monotonic
        self._sleep = sleep
        self._version = 0  # of the lease document this broker wrote last
        #: The state the lease carries: as the cycle saved it, or as found when the lease
        #: was taken (not judged until the cycle loads it).
        self._state: CycleState | dict[str, Any] | None = None
        self._confirmed = -math.inf  # monotonic time of the last write that held the lease
        self._holding = False
        self._lost = False
        self._writing = asyncio.Lock()  # the heartbeat and the cycle's saves, one at a time

    async def load(self, credential_id: str) -> CycleState:
        try:
            doc = await self.session.vault.read(self.ref.mount, self._path)
        except VaultError as exc:
            raise CycleError("error", f"cannot read the cycle's state: {exc}") from None
        found = None if doc is None else doc.data.get("state")
        try:
            state = None if found is None else CycleState.model_validate(found)
        except ValidationError as exc:
            raise CycleError(
                "error",
                f"the cycle's state in {self.where} cannot be read ({exc.error_count()} "
                "problem(s)); check the credential's secrets in the Developer Console, then "
                f"delete it (bao kv metadata delete {self.ref.mount}/{self._path})",
            ) from None
        state = claimed(state, credential_id, self.where)
        if self._holding:
            self._state = state
        return state

    async def save(self, state: CycleState) -> None:
        self._state = state
        await self._write()

    # -- the lease ---------------------------------------------------------------------

    @asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        """Hold the lease for a cycle (CycleError ``busy`` while another broker holds a
        live one), renewed every ``poll`` by a task of its own, released at the end."""
        await self._acquire()
        beat = asyncio.get_running_loop().create_task(self._heartbeat())
        try:
            yield
        finally:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)
            await self._release()

    async def _acquire(self) -> None:
        try:
            now = (await self.ref.report(self.name, self.session)).written
            doc, base = await self.session.vault.read_for_write(self.ref.mount, self._path)
        except VaultError as exc:
            raise CycleError("error", f"cannot take the cycle lease: {exc}") from None
        if doc is not None:
            holder = doc.data.get("holder")
            age = now - doc.written
            if holder not in (None, self.session.broker) and age < self._alive(doc.data):
                raise CycleError(
                    "busy",
                    f"credential {self.name!r}: broker {holder} ({_who(doc.data)}) holds the "
                    f"cycle lease, renewed {max(age, 0):.0f}s ago",
                )
        found = None if doc is None else doc.data.get("state")
        self._state = found if isinstance(found, dict) else None
        # Check-and-set on the newest version, even one deleted (`bao kv delete`).
        self._version = base
        self._holding, self._lost = True, False
        try:
            await self._write()
        except CycleError as exc:
            self._holding = False
            raise CycleError("busy", f"credential {self.name!r}: {exc}") from None
        log.info("cycle %s: holding the cycle lease in %s", self.name, self.where,
                 extra={"event": "cycle_lease", "credential": self.name})  # fmt: skip

    async def _write(self) -> None:
        """Rewrite the lease with the state, check-and-set on our last version."""
        if not self._holding or self._lost:
            raise CycleError("error", f"credential {self.name!r}: the cycle lease is not held")
        data = {"holder": self.session.broker, "host": socket.gethostname(),
                "pid": os.getpid(), "poll": self.poll, "state": self._raw_state()}  # fmt: skip
        async with self._writing:
            try:
                written = await self.session.vault.write(
                    self.ref.mount, self._path, data, cas=self._version
                )
            except CasConflict:
                self._lost = True
                raise CycleError(
                    "busy",
                    f"credential {self.name!r}: another broker took the cycle lease",
                ) from None
            except VaultError as exc:
                raise CycleError("error", f"cannot write the cycle's state: {exc}") from None
            self._version = written.version
            self._confirmed = self._monotonic()

    def _raw_state(self) -> dict[str, Any] | None:
        """The state as the lease document carries it (as found, if not loaded since)."""
        return self._state.model_dump() if isinstance(self._state, CycleState) else self._state

    def _alive(self, data: dict[str, Any]) -> float:
        """How long after its write a lease or report counts as alive (see ALIVE_POLLS)."""
        theirs = data.get("poll")
        if not isinstance(theirs, int | float) or isinstance(theirs, bool) or theirs != theirs:
            theirs = 0.0
        return ALIVE_POLLS * min(max(self.poll, theirs), LONGEST_POLL)

    async def _heartbeat(self) -> None:
        while True:
            await self._sleep(self.poll)
            try:
                await self._write()
            except CycleError as exc:
                log.warning("cycle %s: %s", self.name, exc)
                if self._lost:
                    return

    async def _release(self) -> None:
        if not self._holding or self._lost:
            self._holding = False
            return
        data = {"holder": None, "state": self._raw_state()}
        try:
            async with self._writing:
                await self.session.vault.write(self.ref.mount, self._path, data, cas=self._version)
        except VaultError as exc:  # it expires by itself
            log.warning("cycle %s: could not release the cycle lease: %s", self.name, exc)
        self._holding = False

    async def fence(self) -> float:
        """Before a change at Adobe: make sure the lease is held and return how long it
        surely lasts (the change must end sooner); CycleError if it cannot be confirmed,
        so that nothing changes at Adobe while another broker may hold the lease."""
        if self._lost:
            raise CycleError("busy", f"credential {self.name!r}: another broker took the lease")
        if self._monotonic() - self._confirmed > self.poll:
            await self._write()
        left = ALIVE_POLLS * self.poll - (self._monotonic() - self._confirmed)
        return max(0.5, left / 2)

    # -- every broker on the new version -----------------------------------------------

    async def adopted(self) -> None:
        """Return once every broker that was alive at the switch uses the current version,
        or ``rotate_grace`` after the switch (naming the brokers that do not).

        Alive at the switch: it reported within ``3 × poll`` before the version now
        current was written; one that cannot reach Vault since (and so reports no more)
        is waited for until the grace. Times are Vault's: a report's write time, the
        switch's write time, this broker's own latest report as "now". After a failure to
        read Vault, ``3 × poll`` of fresh reports are awaited before any judgement.
        Reports older than ``rotate_grace`` are removed (brokers that are gone).
        CycleError if the lease is lost meanwhile.
        """
        vault, mount = self.session.vault, self.ref.mount
        fresh_since: float | None = None  # Vault's time from which reports were read
        after_failure = False  # then only 3 x poll of fresh reports may be judged
        while True:
            try:
                if (meta := await vault.metadata(mount, self.ref.path)) is None:
                    raise CycleError("error", f"{self.ref.describe()} is gone from Vault")
                self.session.versions[self.name] = max(
                    self.session.versions.get(self.name, 0), meta.current_version
                )  # this broker switched already
                now = (await self.ref.report(self.name, self.session)).written
                fresh_since = now if fresh_since is None else fresh_since
                lagging = await self._lagging(now, meta.current_version, meta.updated)
            except VaultError as exc:
                log.warning("cycle %s: waiting for Vault to judge the brokers: %s",
                            self.name, exc)  # fmt: skip
                fresh_since, after_failure = None, True
            else:
                judged = not after_failure or now - fresh_since >= ALIVE_POLLS * self.poll
                if not lagging and judged:
                    return
                if now - meta.updated >= self.grace:
                    log.warning(
                        "cycle %s: after rotate_grace (%gs) these brokers still use an older "
                        "version: %s; the old secret is deleted anyway", self.name, self.grace,
                        "; ".join(lagging) or "none", extra={"event": "cycle_laggards"},
                    )  # fmt: skip
                    return
            await self.fence()  # Vault away long enough: the lease is gone, stop
            await self._sleep(self.poll)

    async def _lagging(self, now: float, target: int, switched: float) -> list[str]:
        """The brokers alive at the switch (``switched``) that report an older version
        than ``target``, in words; reports older than ``rotate_grace`` at the switch are
        removed (brokers that are gone; one that fell silent later is named first)."""
        vault, mount = self.session.vault, self.ref.mount
        lagging = []
        for key in await vault.keys(mount, self.ref.reports_path):
            if not BROKER_ID.fullmatch(key):
                continue  # not a broker's report (anyone who may report can write one)
            path = self.ref.report_path(key)
            if (report := await vault.read(mount, path)) is None:
                continue
            if switched - report.written > self.grace and key != self.session.broker:
                await vault.destroy(mount, path)
                continue
            version = report.data.get("version")
            alive = report.written >= switched - self._alive(report.data)
            if alive and (not isinstance(version, int) or version < target):
                lagging.append(f"{key} ({_who(report.data)}) at version {version}")
        return lagging


def _who(data: dict[str, Any]) -> str:
    return f"{str(data.get('host', '?'))[:64]} pid {data.get('pid', '?')}"
