"""Run by test_remote.py inside a fresh network namespace (not collected on its own).

The namespace has 10.200.0.1 on its loopback device: an address that is not
loopback, so a request to it arrives from a non-loopback peer, as a request
from another host would, without touching the host's network.
"""

from __future__ import annotations

import subprocess
import sys

import httpx
from helpers import free_port, write_config

from broker.access import key_digest, new_key

REMOTE = "10.200.0.1"
H = {"X-Token-Broker": "1"}


def test_a_remote_peer_is_served_only_with_a_client_key(start_broker, issuer):
    key = new_key()
    port = free_port()
    broker = start_broker(
        listen=(f"{REMOTE}:{port}",),
        server="allow_remote = true",
        extra=f'[clients.ci]\nkey_sha256 = "{key_digest(key).hex()}"\ncredentials = ["main"]\n',
    )
    url = f"http://{REMOTE}:{port}"
    assert httpx.get(url + "/healthz").status_code == 200
    refused = httpx.get(url + "/token", headers=H)
    assert refused.status_code == 401, refused.text
    token = httpx.get(url + "/token", headers={**H, "Authorization": f"Bearer {key}"})
    assert token.status_code == 200 and len(token.text) > 20
    # The Host rule still holds: only the literal address, never a name (DNS rebinding).
    rebound = httpx.get(
        url + "/token", headers={**H, "Authorization": f"Bearer {key}", "Host": "evil.example"}
    )
    assert rebound.status_code == 403 and "Host" in rebound.json()["detail"]
    assert key not in broker.proc.output()


def test_without_allow_remote_a_remote_listen_is_refused(tmp_path):
    cfg = write_config(tmp_path / "c.toml", f'[server]\nlisten = ["{REMOTE}:{free_port()}"]\n')
    done = subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1 and "loopback is required" in done.stderr
