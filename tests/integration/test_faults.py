"""The fault matrix's wiring: a handful of cases against the broker as a process.

Every upstream behaviour runs in-process under a fake clock in
tests/test_faults.py (seconds for all of them). These four prove the same
properties hold for the real thing, in real time, over real sockets: an
outage, a refused connection (a TCP gate that closes its listener), an issuer
that hangs past the timeout, and a permanent error. Per case: what the broker
serves meanwhile (the cached token while servable, then 503 with
Retry-After), how often it calls the issuer, what /v1/credentials/NAME,
/readyz and the log say, and how it recovers.
"""

from __future__ import annotations

import time

import httpx
import pytest
from helpers import HEADERS, Fault, TcpGate, wait_for

LIFETIME = 4.0  # seconds; scheduled refresh at ~2.7 s, servable until 4 - 0.4 s
REFRESH = 'retry_initial = "0.2s"\nretry_max = "1s"\ntimeout = "1s"\nforce_cooldown = "0s"'


FAULTS = {
    "500": Fault("error500", "internal_error"),
    "connection refused": Fault("gate:refuse", "connection_error"),
    "slower than the timeout": Fault("hang", "timeout", max_calls=5),
    "invalid_client": Fault("invalid_client", "invalid_client", permanent=True, max_calls=1),
}  # fmt: skip


@pytest.mark.parametrize("case", FAULTS, ids=list(FAULTS))
def test_fault_matrix(issuer, start_broker, case):
    fault = FAULTS[case]
    gate = TcpGate(issuer.port)
    issuer.issuer.lifetime = LIFETIME
    issuer.issuer.retry_after = fault.retry_after or 2
    b = start_broker(provider="oauth2", refresh=REFRESH, issuer_url=gate.url)
    client = httpx.Client(base_url=b.url, headers=HEADERS, timeout=5)
    try:
        first = client.get("/token").text
        expires_at = issuer.issuer.issued[first]
        serve_until = expires_at - 0.1 * LIFETIME
        calls_before, conns_before = issuer.issuer.calls, gate.connections

        # Break the issuer, then watch /token across the rest of the token's life.
        if fault.mode == "gate:refuse":
            gate.refuse()
        elif fault.mode == "gate:garbage":
            gate.garbage()
        else:
            issuer.issuer.mode = fault.mode
        last_ok = 0.0
        unavailable = None
        states_while_servable: set[str] = set()
        while time.time() < expires_at + 1.0:
            # The state is asked for first: when the token is served after it, the token
            # was servable when the state was taken (asked after, on a loaded machine it
            # could come past the limit and say "expired" of a token served in time).
            state = client.get("/v1/credentials/main").json()["state"]
            sent = time.time()
            r = client.get("/token")
            now = time.time()
            if r.status_code == 200:
                assert r.text == first, "served something else than the cached token"
                # The broker decided after the request was sent: its own lateness, not
                # the test's, is what this catches.
                assert sent < expires_at, "served an expired token"
                last_ok = now
                if state != "fresh":
                    states_while_servable.add(state)
            else:
                assert r.status_code == 503, r.text
                assert now >= serve_until - 0.5, "stopped serving a servable token"
                unavailable = r
            time.sleep(0.1)
        # A refresh under way or failed with the token still servable: refreshing, then
        # stale (failed if permanent).
        expected = {"refreshing", "failed" if fault.permanent else "stale"}
        assert states_while_servable and states_while_servable <= expected, states_while_servable
        # Served until min_remaining (10% of 4 s), give or take scheduling noise.
        assert last_ok >= serve_until - 0.5
        assert unavailable is not None
        assert int(unavailable.headers["retry-after"]) >= 1
        assert unavailable.json()["error"] == "token_unavailable"
        assert unavailable.json()["last_error"]["error"] == fault.error

        status = client.get("/v1/credentials/main").json()
        assert status["last_error"]["error"] == fault.error
        assert status["state"] in (("failed",) if fault.permanent else ("expired", "refreshing"))
        assert httpx.get(b.url + "/readyz").status_code == 503
        assert "refresh main failed" in b.proc.output() and fault.error in b.proc.output()

        # No hot loop: bounded by backoff, Retry-After and permanence.
        if fault.mode.startswith("gate:"):
            calls = gate.connections - conns_before
        else:
            calls = issuer.issuer.calls - calls_before
        if fault.mode != "gate:refuse":  # a refused connection reaches nobody to count it
            assert 1 <= calls <= fault.max_calls, calls

        # Heal the issuer. Only /readyz is polled: it never triggers a refresh itself.
        issuer.issuer.mode = "ok"
        gate.forward()
        if fault.permanent:
            # No retry is scheduled at all: nothing to wait for.
            assert client.get("/v1/credentials/main").json()["next_refresh_at"] is None
            assert httpx.get(b.url + "/readyz").status_code == 503, "retried a permanent error"
            assert client.post("/v1/credentials/main/refresh").status_code == 200
        wait_for(lambda: httpx.get(b.url + "/readyz").status_code == 200,
                   timeout=(fault.retry_after or 1) + 4, what="did not recover")  # fmt: skip
        healed = client.get("/token")
        assert healed.status_code == 200 and healed.text != first
        assert client.get("/v1/credentials/main").json()["state"] == "fresh"
    finally:
        client.close()
        gate.stop()
