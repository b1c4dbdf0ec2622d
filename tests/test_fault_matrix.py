"""The fault matrix, in-process under a fake clock: every upstream behaviour, quickly.

The broker's manager and ASGI app run against the demo issuer's ASGI app (the
same issuer the process tests use, same failure modes), through a transport
that can also refuse connections or answer bytes that are not HTTP. Time is a
fake clock stepped by 0.1 s through a 4 s token's life; jobs run when due. For
every case: what is served (the cached token while servable, then 503 with
Retry-After and last_error), the state, /readyz, the log line, how often the
issuer is called (bounded backoff, Retry-After, permanent errors once) and the
recovery. A handful of cases also run against the broker as a process
(tests/integration/test_faults.py), to prove the wiring. docs/reliability.md
has one row per case.
"""

from __future__ import annotations

import asyncio
import logging
import random

import helpers
import httpx
import pytest
from helpers import HEADERS, FakeClock, FakeScheduler, Fault
from issuer import TestIssuer

from broker.api import create_app
from broker.manager import Manager

LIFETIME = 4.0  # seconds; scheduled refresh at ~2.7 s, servable until 4 - 0.4 s
STEP = 0.1
POLICY = {
    "retry_initial": "0.2s",
    "retry_max": "1s",
    "timeout": "0.2s",  # real time: only the hanging issuer waits for it
    "force_cooldown": "0s",
}


FAULTS = {
    "500": Fault("error500", "internal_error"),
    "502 with an HTML body": Fault("html502", "http_error"),
    "503 with Retry-After seconds": Fault("unavailable", "temporarily_unavailable",
                                          retry_after=2, max_calls=3),
    "429 with Retry-After seconds": Fault("throttle", "too_many_requests", retry_after=2,
                                          max_calls=3),
    "429 with Retry-After HTTP-date": Fault("throttle_date", "too_many_requests",
                                            retry_after=2, max_calls=3),
    "connection refused": Fault("gate:refuse", "connection_error"),
    "connection reset mid-body": Fault("gate:reset", "connection_error"),
    "TLS-less garbage": Fault("gate:garbage", "connection_error"),
    "200 that is not JSON": Fault("garbage", "invalid_response"),
    "200 without access_token": Fault("no_token", "invalid_response"),
    "200 with a 100 KB access_token": Fault("huge_token", "invalid_response"),
    "expires_in missing": Fault("no_expires", "invalid_response"),
    "expires_in zero": Fault("zero_expires", "invalid_response"),
    "expires_in negative": Fault("negative_expires", "invalid_response"),
    "expires_in absurdly large": Fault("huge_expires", "invalid_response"),
    "token_type other than bearer": Fault("mac_token", "invalid_response"),
    "slower than the timeout": Fault("hang", "timeout"),
    "invalid_client": Fault("invalid_client", "invalid_client", permanent=True, max_calls=1),
    "invalid_scope": Fault("invalid_scope", "invalid_scope", permanent=True, max_calls=1),
    "unauthorized_client": Fault("unauthorized_client", "unauthorized_client", permanent=True,
                                 max_calls=1),
}  # fmt: skip


class Gate(httpx.AsyncBaseTransport):
    """In front of the issuer's ASGI app: forwards, or fails as a network would."""

    def __init__(self, issuer: TestIssuer) -> None:
        self.inner = httpx.ASGITransport(app=issuer)  # type: ignore[arg-type]
        self.mode = "forward"
        self.connections = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.connections += 1
        if self.mode == "refuse":
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        if self.mode == "garbage":
            raise httpx.RemoteProtocolError(
                "illegal status line: b'\\x16\\x03\\x01'", request=request
            )
        if self.mode == "reset":
            raise httpx.RemoteProtocolError(
                "peer closed connection without sending complete message body", request=request
            )
        return await self.inner.handle_async_request(request)


class World:
    """A broker's manager and app, the issuer behind a gate, a fake clock and scheduler."""

    def __init__(self, tmp_path, fault: Fault) -> None:  # type: ignore[no-untyped-def]
        self.clock = FakeClock()
        self.issuer = TestIssuer(lifetime=LIFETIME, clock=self.clock)
        self.issuer.add_client("c", "s3cret-value")
        self.issuer.retry_after = fault.retry_after or 2
        self.gate = Gate(self.issuer)
        secret = tmp_path / "secret"
        secret.write_text("s3cret-value")
        main = {"provider": "oauth2", "client_id": "c", "secret": f"file:{secret}",
                "token_url": "http://issuer.test/oauth2/token"}  # fmt: skip
        settings = helpers.settings({"main": main}, refresh=POLICY)
        self.scheduler = FakeScheduler()
        self.manager = Manager(
            settings,
            client=httpx.AsyncClient(transport=self.gate),
            clock=self.clock,
            scheduler=self.scheduler,
            rand=random.Random(7).random,
        )
        app = create_app(self.manager, clock=self.clock)
        self.api = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),  # type: ignore[arg-type]
            base_url="http://127.0.0.1:8765",
            headers=HEADERS,
        )

    async def settle(self) -> None:
        for credential in self.manager.credentials.values():
            if credential.inflight is not None:
                await asyncio.shield(credential.inflight)

    async def advance(self, until: float) -> None:
        """Move the clock to ``until``, running each job when its time comes."""
        while (job := self.scheduler.next_job()) is not None and job[0] <= until:
            self.clock.now = max(self.clock.now, job[0])
            await self.scheduler.run(job[1])
            await self.settle()
        self.clock.now = until

    def calls(self, fault: Fault) -> int:
        return self.gate.connections if fault.mode.startswith("gate:") else self.issuer.calls


@pytest.mark.parametrize("case", FAULTS, ids=list(FAULTS))
async def test_fault_matrix(tmp_path, caplog, case):
    fault = FAULTS[case]
    world = World(tmp_path, fault)
    api, manager = world.api, world.manager
    await manager.start()
    await world.settle()
    try:
        first = (await api.get("/token")).text
        token = manager.get("main").token
        assert token is not None and token.access_token == first
        expires_at = token.expires_at
        serve_until = expires_at - 0.1 * LIFETIME
        before = world.calls(fault)

        # Break the issuer, then watch /token across the rest of the token's life.
        if fault.mode.startswith("gate:"):
            world.gate.mode = fault.mode[5:]
        else:
            world.issuer.mode = fault.mode
        last_ok = 0.0
        unavailable = None
        states_while_servable: set[str] = set()
        while world.clock.now < expires_at + 1.0:
            await world.advance(world.clock.now + STEP)
            r = await api.get("/token")
            now = world.clock.now
            if r.status_code == 200:
                assert r.text == first, "served something else than the cached token"
                assert now < serve_until, "served a token past min_remaining"
                last_ok = now
                state = (await api.get("/v1/credentials/main")).json()["state"]
                if state != "fresh":
                    states_while_servable.add(state)
            else:
                assert r.status_code == 503, r.text
                assert now >= serve_until, "stopped serving a servable token"
                unavailable = r
        # The refresh failed with the token still servable: stale (failed if permanent).
        expected = {"failed" if fault.permanent else "stale", "refreshing"}
        assert states_while_servable and states_while_servable <= expected, states_while_servable
        assert last_ok >= serve_until - STEP  # served up to min_remaining, not a step less
        assert unavailable is not None
        assert int(unavailable.headers["retry-after"]) >= 1
        assert unavailable.json()["error"] == "token_unavailable"
        assert unavailable.json()["last_error"]["error"] == fault.error

        status = (await api.get("/v1/credentials/main")).json()
        assert status["last_error"]["error"] == fault.error
        assert status["state"] in (("failed",) if fault.permanent else ("expired",))
        assert (await api.get("/readyz")).status_code == 503
        logged = [r for r in caplog.records if r.name == "broker.refresh"]
        assert any("refresh main failed" in r.getMessage() for r in logged)
        assert any(fault.error in r.getMessage() for r in logged)
        assert all(r.levelno >= logging.WARNING for r in logged if "failed" in r.getMessage())

        # No hot loop: bounded by backoff, Retry-After and permanence.
        calls = world.calls(fault) - before
        assert 1 <= calls <= fault.max_calls, calls

        # Heal the issuer. Only /readyz is asked: it never triggers a refresh itself.
        world.issuer.mode = "ok"
        world.gate.mode = "forward"
        if fault.permanent:
            await world.advance(world.clock.now + 60)
            assert (await api.get("/readyz")).status_code == 503, "retried a permanent error"
            assert world.calls(fault) - before == calls
            assert (await api.post("/v1/credentials/main/refresh")).status_code == 200
        await world.advance(world.clock.now + (fault.retry_after or 1) + 1.5)
        assert (await api.get("/readyz")).status_code == 200, "did not recover"
        healed = await api.get("/token")
        assert healed.status_code == 200 and healed.text != first
        assert (await api.get("/v1/credentials/main")).json()["state"] == "fresh"
        assert "s3cret-value" not in caplog.text
    finally:
        await manager.close()
        await api.aclose()


async def test_expires_in_as_a_string_is_accepted(tmp_path):
    world = World(tmp_path, FAULTS["500"])
    world.issuer.mode = "string_expires"
    await world.manager.start()
    await world.settle()
    try:
        data = (await world.api.get("/v1/credentials/main/token")).json()
        assert data["expires_in"] == LIFETIME
        assert data["access_token"].startswith("demo-")
    finally:
        await world.manager.close()
        await world.api.aclose()
