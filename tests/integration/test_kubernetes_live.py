"""What the Kubernetes manifests run, run here against a real broker.

The commands are taken from the rendered manifests (kustomize), not copied:
the sidecar's and the node's exec probes against a live broker, and the node
mode's socket directory as the DaemonSet's init container leaves it, with the
config of the node overlay, two local users (one allowed, one not) and an app's
read-only mount. The broker itself runs as root here, as the other process tests
do (this machine's Python lives under /root, which another uid cannot read); the
directory's owner (the image's uid 10001) is checked with a file it may create.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomlkit
from helpers import BrokerProcess, new_secret, write_config
from kube import broker_config, find, objects, pod_spec

PROBES = ("startupProbe", "livenessProbe", "readinessProbe")


def _probes(overlay: str, kind: str) -> dict[str, list[str]]:
    spec = pod_spec(find(objects(overlay), kind))
    every = spec.get("initContainers", []) + spec["containers"]
    (broker,) = [c for c in every if c["name"] == "token-broker"]
    return {p: list(broker[p]["exec"]["command"]) for p in PROBES}


def _run_probe(command: list[str], replace: tuple[str, str], user: int | None = None) -> int:
    """Run a probe command as the kubelet would, with the broker's address replaced."""
    assert command[0] == "python" and replace[0] in command[4], command
    argv = [sys.executable, *command[1:4], command[4].replace(*replace), *command[5:]]
    kwargs = {} if user is None else {"user": user, "group": user, "extra_groups": []}
    done = subprocess.run(argv, capture_output=True, timeout=30, env={}, **kwargs)
    return done.returncode


def test_sidecar_probes_tell_healthy_ready_and_gone_apart(start_broker):
    probes = _probes("sidecar", "Deployment")
    ready = start_broker()
    address = ('("127.0.0.1", 8765)', f'("127.0.0.1", {ready.port})')
    assert {p: _run_probe(c, address) for p, c in probes.items()} == dict.fromkeys(PROBES, 0)
    # A broker without a servable token (the issuer does not know its client): alive,
    # not ready, so the app does not start and the pod takes no traffic.
    unready = start_broker(register=False)
    address = ('("127.0.0.1", 8765)', f'("127.0.0.1", {unready.port})')
    assert _run_probe(probes["livenessProbe"], address) == 0
    assert _run_probe(probes["readinessProbe"], address) != 0
    assert _run_probe(probes["startupProbe"], address) != 0
    unready.proc.stop()
    assert _run_probe(probes["livenessProbe"], address) != 0


@pytest.fixture
def node_dir() -> Iterator[Path]:
    """/run/token-broker as the kubelet makes it (DirectoryOrCreate): root, 0755."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("CI runs as root: this test needs other uids and a mount namespace")
        pytest.skip("needs root to act as other users and to mount")
    missing = [p for p in ("curl", "setpriv", "unshare", "touch") if shutil.which(p) is None]
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must have {missing} (curl, util-linux: see .ci/run)")
        pytest.skip(f"missing {missing}")
    top = Path(tempfile.mkdtemp(prefix="tb-node-", dir="/tmp"))
    top.chmod(0o755)  # pytest's tmp dirs are 0700: other users could not reach the socket
    path = top / "run-token-broker"
    path.mkdir()
    path.chmod(0o755)
    yield path
    shutil.rmtree(top, ignore_errors=True)


def _as(uid: int, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *command],
        capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def _curl(uid: int, sock: Path, path: str) -> tuple[int, str]:
    done = _as(uid, "curl", "-s", "-o", "-", "-w", "\n%{http_code}", "--unix-socket", str(sock),
               "-H", "X-Token-Broker: 1", f"http://localhost{path}")  # fmt: skip
    body, _, status = done.stdout.rpartition("\n")
    return int(status or 0), body


def test_node_socket_directory_users_and_a_read_only_mount(node_dir, issuer, tmp_path):
    objs = objects("node")
    spec = pod_spec(find(objs, "DaemonSet", "token-broker"))
    (init,) = spec["initContainers"]
    (broker,) = spec["containers"]
    broker_uid = broker["securityContext"]["runAsUser"]
    app_uid = pod_spec(find(objects("node/example-app"), "Deployment"))["securityContext"][
        "runAsUser"
    ]
    stranger = 65534  # nobody: a pod user the config does not name

    # 1. The init container's own command, with exactly the capabilities it is given.
    caps = ",".join("+" + c.lower() for c in init["securityContext"]["capabilities"]["add"])
    command = init["command"]
    assert command[0] == "python" and command[-1] == "/run/token-broker"
    for _ in range(2):  # a fresh node, then a restart that finds the directory already made
        done = subprocess.run(
            ["setpriv", f"--bounding-set=-all,{caps}", "--inh-caps=-all",
             sys.executable, *command[1:-1], str(node_dir)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        st = node_dir.stat()
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o711, broker_uid, broker_uid)

    # 2. The broker's uid may create (and so replace) its socket there; no pod user may
    # create anything there or list it.
    assert _as(broker_uid, "touch", str(node_dir / "probe")).returncode == 0
    (node_dir / "probe").unlink()
    for uid in (app_uid, stranger):
        assert _as(uid, "touch", str(node_dir / "squat")).returncode != 0
        assert _as(uid, "ls", str(node_dir)).returncode != 0
    assert not (node_dir / "squat").exists()

    # 3. The node overlay's config, pointed at this directory and the loopback issuer.
    doc = tomlkit.parse(broker_config(objs))
    sock = node_dir / "broker.sock"
    assert doc["server"]["listen"] == ["unix:/run/token-broker/broker.sock"]
    doc["server"]["listen"] = [f"unix:{sock}"]
    secret = new_secret()
    secret_file = tmp_path / "adobe"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    cred = doc["credentials"]["adobe"]
    cred["secret"] = f"file:{secret_file}"
    cred["ims_url"] = issuer.url
    issuer.issuer.add_client(str(cred["client_id"]), secret)
    assert list(cred["allow_uids"]) == [app_uid]
    proc = BrokerProcess(write_config(tmp_path / "config.toml", tomlkit.dumps(doc)))
    try:
        proc.wait_healthy("http://localhost", uds=str(sock))
        assert sock.stat().st_mode & 0o777 == int(tomllib.loads(doc.as_string())["server"][
            "socket_mode"], 8)  # fmt: skip

        # 4. The allowed pod user reads the token, another is refused by SO_PEERCRED.
        status, token = _curl(app_uid, sock, "/token/adobe")
        assert status == 200 and len(token) > 20, token
        status, body = _curl(stranger, sock, "/token/adobe")
        assert status == 403 and f"uid {stranger} may not read 'adobe'" in body
        assert token not in body

        # 5. An app pod mounts the directory read-only: connecting is not a write.
        mnt = node_dir.parent / "app-mount"  # a place the app uid may reach (tmp_path: 0700)
        mnt.mkdir()
        mnt.chmod(0o755)
        script = (
            f"mount --bind {node_dir} {mnt} && mount -o remount,bind,ro {mnt} && "
            f"exec setpriv --reuid={app_uid} --regid={app_uid} --clear-groups "
            f"curl -sS -o /dev/null -w '%{{http_code}}' --unix-socket {mnt}/broker.sock "
            "-H 'X-Token-Broker: 1' http://localhost/token/adobe"
        )
        done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               script], capture_output=True, text=True, timeout=30)  # fmt: skip
        assert done.stdout == "200", done.stdout + done.stderr

        # 6. The DaemonSet's own probes over this socket.
        probes = _probes("node", "DaemonSet")
        replace = ('"/run/token-broker/broker.sock"', f'"{sock}"')
        assert {p: _run_probe(c, replace) for p, c in probes.items()} == dict.fromkeys(PROBES, 0)

        # 7. Why the DaemonSet has no surge: a second broker on the same socket refuses.
        second = subprocess.run(
            [sys.executable, "-m", "broker", "serve", "--config", str(proc.config)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert second.returncode == 1
        assert "another process is listening there" in second.stderr
        assert _curl(app_uid, sock, "/token/adobe")[0] == 200  # the first one still serves
    finally:
        proc.stop()
    out = proc.output()
    assert secret not in out and token not in out
