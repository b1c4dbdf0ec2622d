"""Adobe's umapi-client in an environment of its own, as the User Sync Tool has it.

umapi-client 3.0.1 pins ``cryptography<39`` and ``PyJWT==2.4.0``; token-broker
must install beside it (DESIGN §9), while the broker itself ships with current
versions (requirements.lock). So the tests do what a user does: a virtualenv
with ``pip install umapi-client==3.0.1 token-broker`` (made by .ci/run at
``/opt/token-broker-ust``, or ``$TOKEN_BROKER_UST_VENV``), and umapi-client
runs there, driven step by step through :class:`Umapi`. Locally the tests skip
when that environment is missing; in CI they fail instead.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

VENV = Path(os.environ.get("TOKEN_BROKER_UST_VENV", "/opt/token-broker-ust"))
PROBE = Path(__file__).with_name("probe.py")
ROOT = Path(__file__).resolve().parents[2]
MAKE = (
    "python3 -m venv /opt/token-broker-ust && "
    "/opt/token-broker-ust/bin/pip install umapi-client==3.0.1 ."
)


def python() -> Path:
    """The environment's interpreter, or skip (fail in CI) naming how to make it."""
    exe = VENV / "bin" / "python"
    if not exe.exists():
        reason = f"no umapi-client environment at {VENV} (make it with: {MAKE})"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + "; .ci/run makes it")
        pytest.skip(reason)
    return exe


class Umapi:
    """A umapi-client process in the environment, one call per :meth:`call`."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("TOKEN_BROKER_")}
        # The checkout's own broker.client, not the copy installed when the environment
        # was made (which proved the two install together).
        clean["PYTHONPATH"] = str(ROOT)
        self.proc = subprocess.Popen(
            [str(python()), str(PROBE)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**clean, **(env or {})},
        )

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"the umapi-client process ended: {err[-2000:]}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def result(self, op: str, **args: Any) -> Any:
        answer = self.call(op, **args)
        assert answer["ok"], answer
        return answer["result"]

    def close(self) -> str:
        """End the process; return what it wrote on stderr."""
        if self.proc.poll() is None:
            try:
                self.call("quit")
            except (AssertionError, BrokenPipeError):
                pass
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err

    def __enter__(self) -> Umapi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
