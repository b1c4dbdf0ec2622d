"""The lifecycle under an injected clock and a test-driven scheduler: no sleeping."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import httpx
import pytest
from helpers import FakeClock, FakeScheduler, settings

from broker.api import status_json
from broker.errors import IssuerError, RefreshCooldown, TokenUnavailable, UnknownCredential
from broker.manager import Manager
from broker.tokens import RefreshPolicy

DAY = 86400.0


class Issuer:
    """A MockTransport handler that answers at the fake clock's time."""

    def __init__(self, clock: FakeClock, lifetime: float = DAY) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.calls = 0
        self.down = False
        self.answer: tuple[int, dict] | None = None  # type: ignore[type-arg]
        self.issued: dict[str, float] = {}
        self.gate: asyncio.Event | None = None
        self.arrived = asyncio.Event()  # set by every request; tests clear it to wait again

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        self.arrived.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.answer is not None:
            status, body = self.answer
            return httpx.Response(status, json=body, headers={"retry-after": "120"})
        if self.down:
            return httpx.Response(503, json={"error": "temporarily_unavailable"})
        token = f"tok-{self.calls}"
        self.issued[token] = self.clock() + self.lifetime
        return httpx.Response(200, json={"access_token": token, "expires_in": self.lifetime})


def one_credential(tmp_path, **policy):  # type: ignore[no-untyped-def]
    """Settings of one oauth2 credential "a" with ``policy`` keys, its secret a real file."""
    secret = tmp_path / "secret"
    secret.write_text("s")
    table = {"provider": "oauth2", "client_id": "a", "token_url": "https://issuer.test/token"}
    return settings({"a": {**table, "secret": f"file:{secret}", **policy}})


def make(tmp_path, clock, issuer, seed=1, **policy):
    client = httpx.AsyncClient(transport=httpx.MockTransport(issuer))
    sched = FakeScheduler()
    manager = Manager(
        one_credential(tmp_path, **policy),
        client=client,
        clock=clock,
        scheduler=sched,
        rand=random.Random(seed).random,
    )
    return manager, sched


async def started(tmp_path, issuer_state=None, **policy):  # type: ignore[no-untyped-def]
    """A manager whose eager fetch is done: (clock, issuer, manager, scheduler).

    ``issuer_state`` sets Issuer attributes (answer, down) before that fetch.
    """
    clock = FakeClock()
    issuer = Issuer(clock)
    for attr, value in (issuer_state or {}).items():
        setattr(issuer, attr, value)
    manager, sched = make(tmp_path, clock, issuer, **policy)
    await manager.start()
    await settle(manager)
    return clock, issuer, manager, sched


async def settle(manager: Manager) -> None:
    for credential in manager.credentials.values():
        if credential.inflight is not None:
            await asyncio.shield(credential.inflight)


async def test_eager_fetch_and_schedule(tmp_path):
    clock = FakeClock()
    issuer = Issuer(clock)
    manager, sched = make(tmp_path, clock, issuer)
    await manager.start()
    assert manager.credentials["a"].state(clock()) == "refreshing"
    await settle(manager)
    token = await manager.token("a")
    assert token.access_token == "tok-1" and issuer.calls == 1
    when, name = sched.next_job()
    assert name == "a"
    assert clock() + 0.62 * DAY <= when <= clock() + 0.72 * DAY
    assert status_json(manager.get("a"), clock(), manager.default)["state"] == "fresh"
    await manager.close()


async def test_thousand_concurrent_cold_requests_make_one_call(tmp_path):
    clock = FakeClock()
    issuer = Issuer(clock)
    issuer.gate = asyncio.Event()
    manager, _ = make(tmp_path, clock, issuer)
    await manager.start()
    waiters = [asyncio.create_task(manager.token("a")) for _ in range(1000)]
    await asyncio.sleep(0)
    issuer.gate.set()
    tokens = await asyncio.gather(*waiters)
    assert {t.access_token for t in tokens} == {"tok-1"}
    assert issuer.calls == 1
    await manager.close()


async def test_expired_token_is_noticed_on_the_next_request(tmp_path):
    """A missed job (suspend/resume, clock jump) never serves an expired token."""
    clock, issuer, manager, sched = await started(tmp_path)
    clock.now += 3 * DAY  # the scheduled job never ran
    token = await manager.token("a")
    assert token.access_token == "tok-2" and token.expires_at > clock()
    # The schedule recovered too: the next job is for the new token.
    when, _ = sched.next_job()
    assert when > clock()
    await manager.close()


async def test_clock_jumping_backwards_keeps_serving(tmp_path):
    clock, issuer, manager, _ = await started(tmp_path)
    clock.now -= 6 * 3600
    assert (await manager.token("a")).access_token == "tok-1"
    assert issuer.calls == 1
    await manager.close()


async def test_permanent_error_fails_without_retry_until_forced(tmp_path):
    clock, issuer, manager, sched = await started(
        tmp_path,
        {"answer": (400, {"error": "invalid_client", "error_description": "bad secret"})},
        force_cooldown="10s",
    )
    entry = manager.credentials["a"]
    assert entry.state(clock()) == "failed" and sched.next_job() is None
    for _ in range(100):
        with pytest.raises(TokenUnavailable):
            await manager.token("a")
    assert issuer.calls == 1
    with pytest.raises(IssuerError, match="invalid_client: bad secret"):
        await manager.force_refresh("a")
    assert issuer.calls == 2
    with pytest.raises(RefreshCooldown) as info:
        await manager.force_refresh("a")
    assert info.value.retry_after == 10
    clock.now += 11
    issuer.answer = None
    assert (await manager.force_refresh("a")).state(clock()) == "fresh"
    await manager.close()


async def test_retry_after_sets_the_next_attempt_and_blocks_forcing(tmp_path):
    clock, issuer, manager, sched = await started(
        tmp_path, {"answer": (429, {"error": "throttled"})}, retry_initial="1s", force_cooldown="0s"
    )
    when, _ = sched.next_job()
    assert when >= clock() + 120
    with pytest.raises(RefreshCooldown) as info:
        await manager.force_refresh("a")
    assert info.value.retry_after == 120
    with pytest.raises(TokenUnavailable) as unavailable:
        await manager.token("a")  # no on-demand attempt inside the backoff window
    assert unavailable.value.retry_after >= 119
    assert issuer.calls == 1
    await manager.close()


async def test_backoff_doubles_to_retry_max(tmp_path):
    clock, issuer, manager, sched = await started(
        tmp_path, {"down": True}, retry_initial="1s", retry_max="60s"
    )
    delays = []
    for _ in range(12):
        when, name = sched.next_job()
        delays.append(when - clock())
        clock.now = when
        await sched.run(name)
        await settle(manager)  # the job starts the refresh; this awaits it
    caps = [min(2**i, 60) for i in range(12)]
    assert all(c / 2 <= d < c for d, c in zip(delays, caps, strict=True)), delays
    assert issuer.calls == 13


async def test_unknown_and_default():
    clock = FakeClock()
    manager = Manager(
        settings(), client=httpx.AsyncClient(), clock=clock, scheduler=FakeScheduler()
    )
    with pytest.raises(UnknownCredential, match="no default credential"):
        await manager.token(None)
    with pytest.raises(UnknownCredential, match="no credential named 'x'"):
        await manager.token("x")
    await manager.close()


async def test_status_has_no_secret_or_token(tmp_path):
    clock, issuer, manager, _ = await started(tmp_path)
    text = repr(status_json(manager.get("a"), 0, None)) + repr(manager.get("a"))
    assert "tok-1" not in text and "'s'" not in text
    await manager.close()


@pytest.mark.parametrize("seed", range(5))
async def test_a_week_of_day_long_tokens_with_random_outages(tmp_path, seed):
    """Seven days, 24 h tokens, outages shorter and longer than a token's remaining life."""
    rng = random.Random(seed)
    clock = FakeClock()
    start = clock.now
    issuer = Issuer(clock)
    manager, sched = make(tmp_path, clock, issuer, seed=seed, retry_max="5m")
    policy: RefreshPolicy = manager.credentials["a"].settings.policy
    outages = []
    t = start + DAY / 2
    while t < start + 7 * DAY:
        length = rng.choice([600, 3 * 3600, 10 * 3600, 30 * 3600])
        outages.append((t, t + length))
        t += length + rng.uniform(DAY, 2 * DAY)

    def in_outage(now: float) -> bool:
        return any(a <= now < b for a, b in outages)

    await manager.start()
    await settle(manager)
    requests = sorted(start + rng.uniform(0, 7 * DAY) for _ in range(3000))
    served = unavailable = 0
    while requests:
        job = sched.next_job()
        if job is not None and job[0] <= requests[0]:
            clock.now = job[0]
            issuer.down = in_outage(clock.now)
            await sched.run(job[1])
            await settle(manager)
            continue
        clock.now = requests.pop(0)
        issuer.down = in_outage(clock.now)
        try:
            token = await manager.token("a")
        except TokenUnavailable:
            unavailable += 1
            # Never leave a servable token unserved: every issued token is past serving.
            limit = min(policy.min_remaining, 0.1 * DAY)
            assert all(clock.now >= exp - limit for exp in issuer.issued.values())
            assert issuer.down
            continue
        served += 1
        assert issuer.issued[token.access_token] > clock.now, "served an expired token"
    successes = len(issuer.issued)
    assert successes <= 7 / 0.62 + len(outages) + 2
    # Between two refreshes with no outage in between: at × lifetime ± jitter × lifetime.
    issued_at = sorted(exp - DAY for exp in issuer.issued.values())
    healthy_gaps = [
        b - a
        for a, b in zip(issued_at, issued_at[1:], strict=False)
        if not any(x < b and a < y for x, y in outages)
    ]
    assert healthy_gaps, "no healthy stretch to measure"
    assert all(0.62 * DAY <= gap <= 0.72 * DAY for gap in healthy_gaps), healthy_gaps
    assert served > 0
    # Bounded retries: at most one per retry_max (5 min) of outage, plus the ramp-up.
    outage_seconds = sum(b - a for a, b in outages)
    assert issuer.calls - successes <= outage_seconds / 150 + 10 * len(outages)
    await manager.close()


async def test_many_credentials_share_a_bounded_number_of_issuer_slots(tmp_path):
    from broker.manager import MAX_CONCURRENT_REFRESHES

    secret = tmp_path / "secret"
    secret.write_text("s")
    in_flight = peak = 0

    async def issuer(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.05)  # 100 credentials / 10 slots × 0.05 s = 0.5 s in all
        in_flight -= 1
        return httpx.Response(200, json={"access_token": "t", "expires_in": 3600})

    creds = {
        f"c{i}": {
            "provider": "oauth2",
            "client_id": "x",
            "token_url": "https://issuer.test/token",
            "secret": f"file:{secret}",
            # Shorter than the whole cold start: waiting for a slot must not count.
            "timeout": "0.3s",
        }
        for i in range(100)
    }
    manager = Manager(
        settings(creds),
        client=httpx.AsyncClient(transport=httpx.MockTransport(issuer)),
        clock=FakeClock(),
        scheduler=FakeScheduler(),
    )
    await manager.start()
    await settle(manager)
    assert peak == MAX_CONCURRENT_REFRESHES
    assert all(e.state(manager._clock()) == "fresh" for e in manager.credentials.values())
    await manager.close()


def accepting_only(good: str, seen: list[str]) -> Callable[[httpx.Request], httpx.Response]:
    """An issuer that accepts one secret (client_secret_post) and notes every one it sees."""

    def issuer(request: httpx.Request) -> httpx.Response:
        secret = dict(httpx.QueryParams(request.content.decode())).get("client_secret", "")
        seen.append(secret)
        if secret != good:
            return httpx.Response(400, json={"error": "invalid_client"})
        return httpx.Response(200, json={"access_token": "t", "expires_in": 3600})

    return issuer


async def test_mid_rotation_invalid_client_tries_the_other_secret_once(tmp_path):
    clock = FakeClock()
    seen: list[str] = []
    issuer = accepting_only("old", seen)
    manager, _ = make(tmp_path, clock, issuer, auth_method="client_secret_post")
    manager.credentials["a"].secrets = ("new", "old")
    await manager.start()
    await settle(manager)
    assert seen == ["new", "old"]
    assert manager.credentials["a"].state(clock()) == "fresh"
    assert manager.credentials["a"].secrets == ("old", "new")  # the working one first now
    # Both refused: one try each, then once what the store holds now ("s", the secret
    # file's), then the permanent error.
    manager.credentials["a"].secrets = ("x", "y")
    seen.clear()
    with pytest.raises(IssuerError, match="invalid_client"):
        await manager.force_refresh("a")
    assert seen == ["x", "y", "s"]
    await manager.close()


async def test_a_refused_secret_is_replaced_by_the_one_stored_now(tmp_path):
    """A secret cycled by another process (`rotate --auto` without the daemon) or a file
    replaced by hand: the issuer refuses the secret held, the stored one works."""
    clock = FakeClock()
    seen: list[str] = []
    issuer = accepting_only("cycled", seen)
    manager, _ = make(tmp_path, clock, issuer, auth_method="client_secret_post")
    manager.credentials["a"].secrets = ("deleted-at-adobe",)
    (tmp_path / "secret").write_text("cycled\n")
    await manager.start()
    await settle(manager)
    assert seen == ["deleted-at-adobe", "cycled"]
    assert manager.credentials["a"].state(clock()) == "fresh"
    assert manager.credentials["a"].secrets == ("cycled",)
    await manager.close()


async def test_reload_keeps_tokens_and_applies_changes(tmp_path):
    clock, issuer, manager, sched = await started(tmp_path)
    token = await manager.token("a")
    base = one_credential(tmp_path)
    # Unchanged credential: same token, no issuer call.
    result = await manager.reload(base)
    assert result["unchanged"] == ["a"] and issuer.calls == 1
    assert await manager.token("a") is token
    # Added and changed at once.
    cred_b = {"provider": "oauth2", "client_id": "b", "token_url": "https://issuer.test/token",
              "secret": f"file:{tmp_path}/secret"}  # fmt: skip
    cred_a = {**cred_b, "client_id": "a2"}
    result = await manager.reload(settings({"a": cred_a, "b": cred_b}))
    assert result["added"] == ["b"] and result["changed"] == ["a"]
    assert (await manager.token("a")) is token  # still served while it refreshes
    await settle(manager)
    assert issuer.calls == 3 and (await manager.token("a")) is not token
    # Removed: gone, job cancelled.
    result = await manager.reload(settings({"b": cred_b}))
    assert result["removed"] == ["a"] and "a" not in sched.jobs
    with pytest.raises(UnknownCredential):
        await manager.token("a")
    await manager.close()


async def test_thousand_requests_on_a_just_expired_token_make_one_call(tmp_path):
    clock, issuer, manager, _ = await started(tmp_path)
    clock.now += DAY  # past expiry, the scheduled job missed (suspend/resume)
    issuer.gate = asyncio.Event()
    waiters = [asyncio.create_task(manager.token("a")) for _ in range(1000)]
    await asyncio.sleep(0)
    issuer.gate.set()
    tokens = await asyncio.gather(*waiters)
    assert {t.access_token for t in tokens} == {"tok-2"}
    assert issuer.calls == 2  # the eager fetch, then exactly one for the crowd
    await manager.close()


async def test_a_missed_apscheduler_job_still_runs():
    """A date job whose time passed (suspend, clock jump) runs late instead of being dropped."""
    from broker.scheduler import APScheduler

    ran: list[str] = []

    async def job(name: str) -> None:
        ran.append(name)

    scheduler = APScheduler()
    scheduler.start()
    try:
        import time as _time

        scheduler.schedule("late", _time.time() - 3600, job)  # an hour overdue
        for _ in range(100):
            if ran:
                break
            await asyncio.sleep(0.02)
        assert ran == ["late"]
        # Rescheduling replaces the job (one per credential), never duplicates it.
        scheduler.schedule("x", _time.time() + 3600, job)
        scheduler.schedule("x", _time.time() + 7200, job)
        assert len(scheduler._sched.get_jobs()) == 1
    finally:
        scheduler.shutdown()


async def test_a_reload_during_an_in_flight_refresh_ends_with_the_new_settings(tmp_path):
    clock, issuer, manager, _ = await started(tmp_path, scopes=["old"])
    seen: list[str] = []
    original = issuer.__call__

    async def recording(request: httpx.Request) -> httpx.Response:
        seen.append(dict(httpx.QueryParams(request.content.decode()))["scope"])
        return await original(request)

    manager.issuers._shared._transport = httpx.MockTransport(recording)  # type: ignore[attr-defined]
    issuer.gate = asyncio.Event()
    issuer.arrived.clear()
    clock.now += DAY  # expired: the next request starts a refresh, still with the old scopes
    waiter = asyncio.create_task(manager.token("a"))
    await issuer.arrived.wait()
    result = await manager.reload(one_credential(tmp_path, scopes=["new"]))
    assert result["changed"] == ["a"]
    issuer.gate.set()
    await waiter
    await settle(manager)
    assert seen == ["old", "new"], seen  # the changed credential was fetched again
    token = await manager.token("a")
    assert token.access_token == f"tok-{issuer.calls}"  # and holds that newest token
    await manager.close()


async def test_waiters_get_token_unavailable_when_the_manager_shuts_down(tmp_path):
    clock, issuer, manager, _ = await started(tmp_path)
    issuer.gate = asyncio.Event()
    clock.now += DAY
    waiters = [asyncio.create_task(manager.token("a")) for _ in range(5)]
    forced = asyncio.create_task(manager.force_refresh("a"))
    issuer.arrived.clear()
    await issuer.arrived.wait()
    manager.stop_waiting()  # what the server does on SIGTERM, before uvicorn's own deadline
    for task in (*waiters, forced):
        with pytest.raises(TokenUnavailable, match="shutting down"):
            await task
    await manager.close()


async def test_a_refresh_whose_answer_comes_after_its_own_refresh_point_is_not_dropped():
    """With short tokens and a slow issuer, the next refresh is due before the job ends."""
    import time as _time

    from broker.scheduler import APScheduler

    # The real APScheduler, on the real clock, runs a job at once when its time is past.
    # The manager's clock is an hour behind: every refresh point it plans is past already
    # when it is scheduled, as for a short token whose answer came late, while the job
    # that asked for it might still be running. No time has to pass for that.
    clock = FakeClock(_time.time() - 3600)
    calls = 0
    sixth = asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 6:
            sixth.set()
        clock.now += 0.3  # longer than the token's whole refresh window below
        return httpx.Response(200, json={"access_token": f"t{calls}", "expires_in": 1})

    cfg = settings(
        {
            "a": {
                "provider": "oauth2",
                "client_id": "a",
                "token_url": "https://issuer.test/token",
                "secret": "env:HOME",
                "at": 0.1,
                "jitter": 0.0,
            }
        }
    )
    scheduler = APScheduler()
    manager = Manager(
        cfg,
        client=httpx.AsyncClient(transport=httpx.MockTransport(slow)),
        clock=clock,
        scheduler=scheduler,
    )
    scheduler.start()
    await manager.start()
    try:
        async with asyncio.timeout(10):  # only a guard: a dropped refresh never comes
            await sixth.wait()
    except TimeoutError:
        raise AssertionError(f"refreshes stopped after {calls} calls") from None
    finally:
        await manager.close()
        scheduler.shutdown()
