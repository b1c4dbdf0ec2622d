"""Remote peers, in network namespaces this test creates: a non-loopback listen with
allow_remote, and the cluster mode's main API over TLS to a client in another namespace."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def test_remote_peers_need_allow_remote_and_a_client_key():
    missing = [p for p in ("unshare", "ip") if shutil.which(p) is None]
    if os.geteuid() != 0 or missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run this as root with unshare and ip (missing: {missing})")
        pytest.skip("needs root, unshare and ip to make a network namespace")
    script = (
        f"ip link set lo up && ip addr add 10.200.0.1/32 dev lo && exec {sys.executable} "
        f"-m pytest -q -p no:cacheprovider {HERE / 'netns_remote.py'}"
    )
    done = subprocess.run(
        ["unshare", "--net", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=HERE.parent.parent,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 passed" in done.stdout, done.stdout
