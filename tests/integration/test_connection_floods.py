"""Connection floods against the broker as a process, under a low open-file limit.

The broker is started with ``RLIMIT_NOFILE`` at :data:`NOFILE` (soft and hard, set by a
``sitecustomize`` on its ``PYTHONPATH`` before anything else runs), so a few hundred
sockets are enough to reach it: (320 - 256 kept for the rest) // 2 listeners = 32
connections per listener.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from helpers import HEADERS, metric, reserve_port, wait_for

from broker.access import new_key

NOFILE = 320
CAP = (NOFILE - 256) // 2


def limited(start_broker, tmp_path: Path, **kw):  # type: ignore[no-untyped-def]
    """``start_broker`` with the broker's RLIMIT_NOFILE at NOFILE (soft and hard)."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        f"import resource\nresource.setrlimit(resource.RLIMIT_NOFILE, ({NOFILE}, {NOFILE}))\n"
    )
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": path, **kw.pop("env", {})}
    return start_broker(env=env, **kw)


def closed(sock: socket.socket, timeout: float) -> bool:
    """True once the broker has closed ``sock`` (EOF or reset) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def test_a_flood_of_idle_connections_to_the_ims_port_leaves_the_main_listener_serving(
    start_broker, tmp_path
):
    """More idle connections to the IMS port than the process has descriptors: the main
    listener still serves /token; what went over the IMS listener's cap is refused,
    counted and logged; the connections that never sent a ClientHello are closed after
    header_timeout (the loop's default was 60 s)."""
    key = new_key()
    port = reserve_port()
    state = tmp_path / "state"
    broker = limited(
        start_broker, tmp_path,
        server=f'ims_listen = ["127.0.0.1:{port}"]\nheader_timeout = "2s"',
        extra=f'[clients.ust]\nkey_sha256 = "{hashlib.sha256(key.encode()).hexdigest()}"\n'
        'credentials = ["main"]\n',
        env={"XDG_STATE_HOME": str(state)},
    )  # fmt: skip
    wait_for(lambda: httpx.get(broker.url + "/readyz").status_code == 200, what="ready")
    auth = {**HEADERS, "Authorization": f"Bearer {key}"}  # ims_listen needs a client key
    flood = [socket.create_connection(("127.0.0.1", port)) for _ in range(NOFILE + 40)]
    try:
        # The main listener serves while the IMS port is flooded (on fresh connections).
        for _ in range(20):
            assert httpx.get(broker.url + "/token", headers=auth, timeout=5).status_code == 200
        refused = f'token_broker_refused_connections_total{{listener="127.0.0.1:{port}"}}'
        wait_for(lambda: metric(broker.url, refused) == len(flood) - CAP, what="refusals")
        limit = f'token_broker_connection_limit{{listener="127.0.0.1:{port}"}}'
        assert metric(broker.url, limit) == CAP
        assert re.search(
            rf"WARNING broker\.connections: 127\.0\.0\.1:{port}: connection from 127\.0\.0\.1:"
            rf"\d+ refused: {CAP} connections open",
            broker.proc.output(),
        ), broker.proc.output()
        # Each accepted one is closed for want of a handshake, within header_timeout.
        started = time.monotonic()
        assert all(closed(sock, 20) for sock in flood)
        assert time.monotonic() - started < 20  # not the loop's 60 s
    finally:
        for sock in flood:
            sock.close()
    timeouts = (
        f'token_broker_tls_handshake_failures_total{{listener="127.0.0.1:{port}",reason="timeout"}}'
    )
    assert metric(broker.url, timeouts) == CAP
    out = broker.proc.output()
    logged = re.findall(
        rf"INFO broker\.connections: TLS handshake from 127\.0\.0\.1:\d+ on "
        rf"127\.0\.0\.1:{port} failed: timeout: no handshake within",
        out,
    )
    assert len(logged) == 1, out  # rate-limited: one line for the lot
    assert out.count("refused: ") == 1, out
    # Every connection series docs/observability.md lists is exposed, one per listener.
    readme = (Path(__file__).parents[2] / "docs" / "observability.md").read_text()
    table = readme.split("Connections, per listening socket", 1)[1].split("\n\n", 2)[1]
    listed = re.findall(r"^\| `(token_broker_\w+)` \| (\w+) \|", table, re.M)
    assert len(listed) == 5
    text = httpx.get(broker.url + "/metrics").text
    for name, kind in listed:
        assert f"# TYPE {name} {kind}" in text and re.search(rf"^{name}{{listener=", text, re.M)
    # And the IMS listener serves again once the flood is gone.
    ca = subprocess.run(
        [sys.executable, "-m", "broker", "tls", "ca"], capture_output=True, text=True,
        env={**os.environ, "XDG_STATE_HOME": str(state)}, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    import ssl

    with httpx.Client(verify=ssl.create_default_context(cafile=ca)) as client:
        form = {"grant_type": "client_credentials", "client_id": "broker-client",
                "client_secret": key, "scope": "openid"}  # fmt: skip
        assert client.post(f"https://127.0.0.1:{port}/ims/token/v3", data=form).status_code == 200


def test_a_plain_listener_at_its_cap_closes_idle_connections_first_then_refuses(
    start_broker, tmp_path
):
    """Busy connections (a request under way) are never closed to make room: over the
    cap a new one gets 503 and the refusal is counted and logged, while the other
    listener (here the unix socket) serves. Idle keep-alive ones make room, oldest first."""
    path = tmp_path / "b.sock"
    broker = limited(start_broker, tmp_path, listen=(f"unix:{path}",),
                     server='header_timeout = "30s"')  # fmt: skip
    unix = httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), headers=HEADERS)
    busy = []
    for _ in range(CAP):
        sock = socket.create_connection(("127.0.0.1", broker.port))
        sock.sendall(b"GET /token HTTP/1.1\r\nHost: loc")  # a request under way
        busy.append(sock)
    wait_for(lambda: metric_unix(unix, broker.port, "open") == CAP, what="all connections open")
    with socket.create_connection(("127.0.0.1", broker.port), timeout=10) as extra:
        answer = b""
        while chunk := extra.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 503 ") and b"too_many_connections" in answer
    assert metric_unix(unix, broker.port, "refused") == 1
    assert unix.get("http://localhost/token").status_code == 200  # the other listener serves
    assert f"127.0.0.1:{broker.port}: connection from 127.0.0.1:" in broker.proc.output()
    for sock in busy:
        sock.close()
    wait_for(lambda: metric_unix(unix, broker.port, "open") == 0, what="busy ones gone")
    # Now CAP idle keep-alive connections, each after one whole request.
    idle = []
    for _ in range(CAP):
        sock = socket.create_connection(("127.0.0.1", broker.port), timeout=10)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        idle.append(sock)
    try:
        token = httpx.get(broker.url + "/token", headers=HEADERS, timeout=10)
        assert token.status_code == 200  # served: idle ones made room
        assert metric_unix(unix, broker.port, "idle_closed") >= 1
        assert metric_unix(unix, broker.port, "refused") == 1  # no new refusal
        assert closed(idle[0], 10)  # the oldest went first
    finally:
        for sock in idle:
            sock.close()
        unix.close()


def metric_unix(client: httpx.Client, port: int, what: str) -> int:
    """A listener series of the TCP port ``port``, read over the unix socket."""
    series = {
        "open": "token_broker_open_connections",
        "refused": "token_broker_refused_connections_total",
        "idle_closed": "token_broker_idle_connections_closed_total",
    }[what]
    text = client.get("http://localhost/metrics").text
    found = re.search(rf'^{series}{{listener="127\.0\.0\.1:{port}"}} (\d+)$', text, re.M)
    return int(found.group(1)) if found else 0
