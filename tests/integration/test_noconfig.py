"""Commands that only talk to a running daemon need no config file (DESIGN §9).

The daemon is found by ``--url``, else ``$TOKEN_BROKER_URL``, else the
config's first listen address when a config file exists, else
``http://127.0.0.1:8765``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import HEADERS, config_file, reserve_port

from broker.cli import main

ETC_CONFIG = Path("/etc/token-broker/config.toml")


@pytest.fixture
def no_config(tmp_path, monkeypatch):
    """No config file reachable: no $TOKEN_BROKER_CONFIG, an empty XDG config home."""
    assert not ETC_CONFIG.exists(), f"{ETC_CONFIG} exists here: these tests need a host without"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    for var in ("TOKEN_BROKER_CONFIG", "TOKEN_BROKER_URL", "TOKEN_BROKER_CLIENT_KEY",
                "TOKEN_BROKER_CLIENT_KEY_FILE"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)


def test_url_flag_without_any_config(no_config, start_broker, capsys):
    b = start_broker()
    assert main(["list", "--url", b.url]) == 0
    out = capsys.readouterr().out
    assert "main" in out and "fresh" in out
    assert main(["token", "main", "--url", b.url]) == 0
    token = capsys.readouterr().out.strip()
    assert token == httpx.get(b.url + "/token", headers=HEADERS).text
    assert main(["health", "--ready", "--url", b.url]) == 0
    assert main(["reload", "--json", "--url", b.url]) == 0  # the daemon re-reads its own file
    assert '"unchanged"' in capsys.readouterr().out


def test_environment_url_and_its_precedence(no_config, start_broker, tmp_path, capsys, monkeypatch):
    b = start_broker()
    monkeypatch.setenv("TOKEN_BROKER_URL", b.url)
    assert main(["list"]) == 0
    assert "main" in capsys.readouterr().out
    # --url beats the environment; the environment beats a config file.
    dead = f"http://127.0.0.1:{reserve_port()}"
    assert main(["list", "--url", dead]) == 1
    assert f"cannot reach the token broker at {dead}" in capsys.readouterr().err
    config = config_file(tmp_path / "c.toml", server={"listen": [dead[7:]]})
    assert main(["token", "--config", str(config)]) == 0
    monkeypatch.delenv("TOKEN_BROKER_URL")
    assert main(["token", "--config", str(config)]) == 1
    assert dead in capsys.readouterr().err


def test_an_explicit_config_that_is_missing_is_an_error(no_config, tmp_path, capsys):
    missing = tmp_path / "missing.toml"
    assert main(["list", "--config", str(missing)]) == 1
    assert "config file not found" in capsys.readouterr().err


def test_unix_socket_url(no_config, start_broker, capsys):
    import shutil
    import tempfile

    short = Path(tempfile.mkdtemp(prefix="tb-noconf-", dir="/tmp"))
    try:
        sock = short / "b.sock"
        start_broker(listen=(f"unix:{sock}",))
        assert main(["list", "--url", f"unix:{sock}"]) == 0
        assert "main" in capsys.readouterr().out
    finally:
        shutil.rmtree(short, ignore_errors=True)


@pytest.mark.xdist_group("port-8765")  # parallel runs keep the tests that need 8765 apart
def test_demo_then_list_and_exec_with_nothing_configured(tmp_path):
    """A new user: `token-broker demo` in one terminal, `token-broker list` in another.

    Uses the default address 127.0.0.1:8765, as test_demo.py does: keep it short.
    """
    with socket.socket() as probe:
        busy = probe.connect_ex(("127.0.0.1", 8765)) == 0
    assert not busy, "port 8765 is taken: stop whatever listens there to run this test"
    assert not ETC_CONFIG.exists(), f"{ETC_CONFIG} exists here: this test needs a host without"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKEN_BROKER_")}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "xdg"))
    log = tmp_path / "demo.out"
    with open(log, "wb") as out:
        demo = subprocess.Popen(
            [sys.executable, "-m", "broker", "demo", "--lifetime", "60"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get("http://127.0.0.1:8765/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert demo.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        cli = [sys.executable, "-m", "broker"]
        listed = subprocess.run([*cli, "list"], env=env, capture_output=True, text=True)
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.splitlines()[1].split()[:3] == ["demo", "oauth2", "fresh"]
        shown = subprocess.run(
            [*cli, "exec", "--", "sh", "-c", 'echo "$TOKEN_BROKER_ACCESS_TOKEN"'],
            env=env, capture_output=True, text=True,
        )  # fmt: skip
        token = httpx.get("http://127.0.0.1:8765/token", headers=HEADERS).text
        assert shown.stdout == token + "\n"
    finally:
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=15) == 0
    banner = log.read_text()
    assert "from broker.client import TokenBroker" in banner
    assert "token-broker exec -- sh -c" in banner
    assert token not in banner
