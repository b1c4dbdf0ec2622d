"""Where the daemon's timed jobs live: each credential's next refresh, each cycle's next run.

A small :class:`Scheduler` interface, so the lifecycle runs under a fake clock
in tests, and :class:`APScheduler` on APScheduler 3's AsyncIOScheduler (timers,
no polling) in the daemon, shared by the manager and the secret cycling.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Protocol

log = logging.getLogger("broker.scheduler")

Job = Callable[[str], Awaitable[None]]  # called with the job's id


class Scheduler(Protocol):
    """One job per id, replaced on every schedule."""

    def start(self) -> None: ...
    def schedule(self, name: str, when: float, job: Job) -> None: ...
    def cancel(self, name: str) -> None: ...
    def shutdown(self) -> None: ...


class APScheduler:
    """:class:`Scheduler` on APScheduler 3's AsyncIOScheduler.

    APScheduler 3 removes a date job when it is submitted, so every schedule is
    a fresh ``add_job(replace_existing=True)`` (never ``reschedule_job`` from
    inside the job: its issue #174); a late job still runs
    (``misfire_grace_time=None``), one at a time (``max_instances=1``,
    ``coalesce``); a job's exception is only logged by APScheduler, so a listener
    logs it as ours.
    """

    def __init__(self) -> None:
        from apscheduler.events import EVENT_JOB_ERROR
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

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
        log.error("job %s raised %r", event.job_id, event.exception)
