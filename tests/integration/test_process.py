"""Process faults: kill -9 mid-refresh and restart; SIGTERM with requests in flight.

Timings are reported by bench/soak.py (docs/reliability.md), not asserted here
beyond generous bounds: this machine is shared and noisy.
"""

from __future__ import annotations

import hashlib
import signal
import threading
import time

import httpx
from helpers import HEADERS, BrokerProcess


def digest(*paths) -> str:  # type: ignore[no-untyped-def]
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def test_kill_9_mid_refresh_then_restart(issuer, start_broker, tmp_path):
    issuer.issuer.delay = 0.5
    b = start_broker(wait=False)
    files = [b.proc.config, *tmp_path.glob("secret-*")]
    before = digest(*files)
    deadline = time.monotonic() + 10
    while issuer.issuer.calls == 0:  # the eager fetch has reached the issuer...
        assert time.monotonic() < deadline
        time.sleep(0.01)
    b.proc.proc.kill()  # ...and the broker dies before the answer
    assert b.proc.proc.wait(5) == -signal.SIGKILL
    assert digest(*files) == before, "the broker wrote to its config or secret"

    again = BrokerProcess(b.proc.config)
    try:
        again.wait_healthy(b.url)
        deadline = time.monotonic() + 10
        while httpx.get(b.url + "/readyz").status_code != 200:
            assert time.monotonic() < deadline, again.output()
            time.sleep(0.02)
        token = httpx.get(b.url + "/token", headers=HEADERS).text
        assert token in issuer.issuer.issued
    finally:
        assert again.stop() == 0
    assert digest(*files) == before


def test_sigterm_lets_requests_in_flight_finish_and_refuses_new_ones(issuer, start_broker):
    issuer.issuer.delay = 0.8  # a cold start: the first /token waits for the issuer
    b = start_broker()
    results: list[httpx.Response] = []
    waiting = threading.Thread(
        target=lambda: results.append(httpx.get(b.url + "/token", headers=HEADERS, timeout=10))
    )
    waiting.start()
    time.sleep(0.2)  # the request is in flight, waiting on the refresh
    stopped = time.monotonic()
    b.proc.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    try:
        httpx.get(b.url + "/healthz", timeout=2)
        refused = False
    except httpx.TransportError:
        refused = True
    waiting.join(10)
    assert b.proc.proc.wait(10) == 0
    took = time.monotonic() - stopped
    assert refused, "a new connection was accepted after SIGTERM"
    assert results and results[0].status_code == 200, "the request in flight was dropped"
    assert results[0].text in issuer.issuer.issued
    assert took < 5  # the figure (about 0.7 s here) is in docs/reliability.md
