"""A real Secret Service for tests and benchmarks: gnome-keyring on a private D-Bus session.

Everything lives under a temporary directory (HOME, XDG dirs, the bus), the
login collection is created and unlocked non-interactively with a throwaway
password, and :meth:`stop` kills both daemons. Nothing touches the user's
own keyring or session bus.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

PROGRAMS = ("dbus-daemon", "gnome-keyring-daemon", "secret-tool")


def missing_programs() -> list[str]:
    return [p for p in PROGRAMS if shutil.which(p) is None]


class SecretServiceSession:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tb-keyring-"))
        self.env: dict[str, str] = {}
        self._pids: list[int] = []

    def start(self) -> SecretServiceSession:
        home, run = self.dir / "home", self.dir / "run"
        home.mkdir()
        run.mkdir(mode=0o700)
        base = {
            "HOME": str(home),
            "XDG_RUNTIME_DIR": str(run),
            "XDG_DATA_HOME": str(home / ".local" / "share"),
            "XDG_CONFIG_HOME": str(home / ".config"),
        }
        env = {**os.environ, **base}
        env.pop("PYTHON_KEYRING_BACKEND", None)
        out = subprocess.run(
            ["dbus-daemon", "--session", "--fork", "--print-address=1", "--print-pid=1"],
            env=env, capture_output=True, text=True, check=True, timeout=20,
        ).stdout.split()  # fmt: skip
        address, bus_pid = out[0], int(out[1])
        self._pids.append(bus_pid)
        env["DBUS_SESSION_BUS_ADDRESS"] = address
        keyring = subprocess.run(
            ["gnome-keyring-daemon", "--unlock", "--components=secrets", "--daemonize"],
            input="throwaway-test-password", env=env, capture_output=True, text=True,
            check=True, timeout=20,
        )  # fmt: skip
        for line in keyring.stdout.splitlines():
            if line.startswith("GNOME_KEYRING_CONTROL="):
                env["GNOME_KEYRING_CONTROL"] = line.split("=", 1)[1]
        self.env = {**base, "DBUS_SESSION_BUS_ADDRESS": address}
        self._wait_ready(env)
        return self

    def _wait_ready(self, env: dict[str, str]) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            probe = subprocess.run(
                ["secret-tool", "lookup", "service", "tb-probe", "username", "none"],
                env=env, capture_output=True, timeout=10,
            )  # fmt: skip
            if probe.returncode in (0, 1) and not probe.stderr:
                self._pids += _keyring_pids(env["XDG_RUNTIME_DIR"])
                return
            time.sleep(0.1)
        raise RuntimeError("gnome-keyring did not come up on the private bus")

    def lookup(self, service: str, username: str) -> str | None:
        """What the keyring itself holds (secret-tool), bypassing our code."""
        r = subprocess.run(
            ["secret-tool", "lookup", "service", service, "username", username],
            env={**os.environ, **self.env}, capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        return r.stdout if r.returncode == 0 else None

    def stop(self) -> None:
        for pid in reversed(self._pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


def _keyring_pids(runtime_dir: str) -> list[int]:
    """gnome-keyring-daemon daemonizes: find it by the runtime dir in its environment."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().strip() != "gnome-keyring-d":
                continue
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if f"XDG_RUNTIME_DIR={runtime_dir}".encode() in environ:
            pids.append(int(proc.name))
    return pids
