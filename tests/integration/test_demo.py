"""`token-broker demo`: zero setup, a token on 127.0.0.1:8765, refreshed ahead of expiry."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from helpers import HEADERS

URL = "http://127.0.0.1:8765"


@pytest.mark.xdist_group("port-8765")  # parallel runs keep the tests that need 8765 apart
def test_demo_serves_and_refreshes_a_token_on_8765(tmp_path):
    with socket.socket() as probe:
        busy = probe.connect_ex(("127.0.0.1", 8765)) == 0
    assert not busy, "port 8765 is taken: stop whatever listens there to run the demo test"
    out = open(tmp_path / "demo.out", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "demo", "--lifetime", "6"],
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    try:
        tokens: list[str] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(tokens) < 2:
            try:
                r = httpx.get(URL + "/token", headers=HEADERS, timeout=2)
            except httpx.TransportError:
                time.sleep(0.1)
                continue
            assert r.status_code == 200, r.text
            assert r.text.startswith("demo-")
            if r.text not in tokens:
                tokens.append(r.text)
            time.sleep(0.2)
        assert len(tokens) >= 2, "the demo token was not refreshed"
        status = httpx.get(URL + "/v1/credentials/demo", headers=HEADERS).json()
        assert status["state"] == "fresh" and status["provider"] == "oauth2"
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=10)
        out.close()
    text = (tmp_path / "demo.out").read_text()
    assert code == 0
    assert "curl -s -H 'X-Token-Broker: 1' http://127.0.0.1:8765/token" in text
    assert not any(t in text for t in tokens)
