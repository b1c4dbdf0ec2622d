"""systemd integration with systemd's own tools and a real NOTIFY_SOCKET.

- the units are linted by ``systemd-analyze verify`` and scored by
  ``systemd-analyze security --offline=yes``;
- sd_notify messages are received on a real datagram socket;
- socket activation goes through ``systemd-socket-activate``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from helpers import HEADERS, config_file, reserve_port

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"


def need(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{program} is missing: CI must install systemd")
        pytest.skip(f"{program} is not installed")
    return path


def installed_units(tmp_path: Path) -> list[Path]:
    """The units with ExecStart= pointing at this machine's token-broker script.

    `verify` checks that the binary exists; the units name the usual install
    path (/opt/token-broker/bin, ~/.local/share/token-broker/bin), which a test machine
    may not have.
    """
    script = shutil.which("token-broker") or str(Path(sys.executable).parent / "token-broker")
    assert Path(script).exists(), "token-broker is not installed (pip install .)"
    out = []
    for unit in [*UNITS.glob("*.service"), *UNITS.glob("*.socket"), *UNITS.glob("user/*")]:
        target = tmp_path / unit.relative_to(UNITS)
        target.parent.mkdir(exist_ok=True)
        text = unit.read_text()
        text = text.replace("/opt/token-broker/bin/token-broker", script)
        text = text.replace("%h/.local/share/token-broker/bin/token-broker", script)
        target.write_text(text)
        out.append(target)
    return out


def test_units_pass_systemd_analyze_verify(tmp_path):
    need("systemd-analyze")
    units = installed_units(tmp_path)
    system = [str(u) for u in units if u.parent == tmp_path]
    r = subprocess.run(["systemd-analyze", "verify", *system], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout + r.stderr == ""
    # A short runtime dir: other user units' socket paths must fit in 108 bytes.
    with tempfile.TemporaryDirectory(prefix="xdg-", dir="/tmp") as runtime:
        user = [str(u) for u in units if u.parent.name == "user"]
        r = subprocess.run(
            ["systemd-analyze", "verify", "--user", *user],
            capture_output=True, text=True, env={**os.environ, "XDG_RUNTIME_DIR": runtime},
        )  # fmt: skip
    assert r.returncode == 0 and r.stdout + r.stderr == ""


def test_system_unit_exposure_is_at_most_2(tmp_path):
    need("systemd-analyze")
    r = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(UNITS / "token-broker.service")],
        capture_output=True, text=True,
    )  # fmt: skip
    m = re.search(r"Overall exposure level for token-broker.service: ([\d.]+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0


class NotifySocket:
    """The service manager's end of sd_notify: a datagram socket we read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def wait_for(self, line: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(line in m.splitlines() for m in self.messages):
                return
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                pass
        raise AssertionError(f"no {line!r} in {self.messages}")

    def collect(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                pass

    def close(self) -> None:
        self.sock.close()


def test_sd_notify_ready_status_watchdog_reload_stopping(issuer, start_broker, tmp_path):
    issuer.issuer.delay = 1.0  # READY must wait for the first token round
    notify = NotifySocket(tmp_path / "notify")
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"}
    try:
        b = start_broker(wait=False, env=env)
        notify.wait_for("READY=1")
        assert issuer.issuer.issued, "READY=1 came before the first token round"
        ready = next(m for m in notify.messages if "READY=1" in m)
        assert "STATUS=1 credential(s): 1 fresh" in ready
        count = sum("WATCHDOG=1" in m for m in notify.messages)
        notify.collect(0.6)  # pings every 0.1 s (half of WATCHDOG_USEC)
        assert sum("WATCHDOG=1" in m for m in notify.messages) >= count + 2
        notify.messages.clear()
        b.proc.proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING=1")
        reloading = next(m for m in notify.messages if "RELOADING=1" in m)
        assert re.search(r"MONOTONIC_USEC=\d+", reloading)
        notify.wait_for("READY=1")
        assert httpx.get(b.url + "/token", headers=HEADERS).status_code == 200
        b.proc.proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1")
        assert b.proc.proc.wait(timeout=5) == 0
    finally:
        notify.close()


def test_socket_activation_uses_the_passed_sockets(issuer, tmp_path):
    need("systemd-socket-activate")
    secret = tmp_path / "s"
    secret.write_text("sa-secret")
    issuer.issuer.add_client("c", "sa-secret")
    unused = reserve_port()  # the config's own address: must stay unbound
    sa = {"provider": "oauth2", "client_id": "c", "token_url": f"{issuer.url}/oauth2/token",
          "secret": f"file:{secret}"}  # fmt: skip
    config = config_file(
        tmp_path / "c.toml", {"sa": sa}, server={"listen": [f"127.0.0.1:{unused}"]}
    )
    port = reserve_port()
    sock_path = tmp_path / "sa.sock"
    log = open(tmp_path / "sa.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "-l", str(sock_path),
         "--fdname=tcp:unix", sys.executable, "-m", "broker", "serve", "--config", str(config)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while not sock_path.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # The first connection starts the daemon; the request waits in the backlog.
        r = httpx.get(f"http://127.0.0.1:{port}/token", headers=HEADERS, timeout=20)
        assert r.status_code == 200 and r.text in issuer.issuer.issued
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock_path))) as client:
            assert client.get("http://localhost/token", headers=HEADERS).text == r.text
        # The guards hold on passed sockets too.
        assert httpx.get(f"http://127.0.0.1:{port}/token").status_code == 403
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", unused)) != 0, "bound its own socket too"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        log.close()
    assert "listening on 127.0.0.1:" in (tmp_path / "sa.log").read_text()


def test_socket_activation_refuses_a_non_loopback_socket(tmp_path):
    need("systemd-socket-activate")
    a = {"provider": "oauth2", "client_id": "a", "token_url": "http://127.0.0.1:9/t",
         "secret": "env:HOME"}  # fmt: skip
    config = config_file(tmp_path / "c.toml", {"a": a})
    port = reserve_port()
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", f"0.0.0.0:{port}",
         sys.executable, "-m", "broker", "serve", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while True:  # connect over loopback to trigger the start
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert "loopback is required" in out


def test_units_give_every_listener_its_most_connections():
    """The system unit filters setrlimit, so the daemon cannot raise its own soft limit:
    LimitNOFILE= must leave each of three listeners its full share (broker.connections)."""
    from broker.connections import MAX_PER_LISTENER, connection_limit

    for unit in (UNITS / "token-broker.service", UNITS / "user" / "token-broker.service"):
        found = re.findall(r"^LimitNOFILE=(\d+)$", unit.read_text(), re.M)
        assert len(found) == 1, f"{unit} sets no single LimitNOFILE="
        assert connection_limit(int(found[0]), 3) == MAX_PER_LISTENER, unit
