"""The env file: sh, bash, systemd's EnvironmentFile= and Docker's --env-file read the same.

Each reader is the real program where it can run: dash and bash source the
file; systemd reads it as a unit's ``EnvironmentFile=`` (through
``systemd-run`` when a system manager runs, else through a user manager of
its own in a private mount namespace); Docker's parsing is modelled from
docker/cli's ``pkg/kvfile`` (28.x keeps quotes, newer versions drop one
matching pair), and checked against the real ``docker`` CLI when one is
installed, through a stand-in for the engine's API that records the
container's ``Env`` (no engine is needed: the CLI parses the file itself).
"""

from __future__ import annotations

import json
import os
import shutil
import socketserver
import subprocess
import tempfile
import unicodedata
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from helpers import ServerThread

from broker.variables import PREFIX, EnvFileError, TokenExport, env_file, variables

IN_CI = os.environ.get("CI") == "true"


def unavailable(reason: str) -> None:
    """Skip here; fail in CI, which installs every reader (see .ci/run)."""
    if IN_CI:
        pytest.fail(f"{reason} (CI must run this reader)")
    pytest.skip(reason)


# -- the readers ----------------------------------------------------------------------


def shell_reads(shell: str, path: Path) -> dict[str, str]:
    """What ``set -a; . FILE`` exports in ``shell``."""
    if shutil.which(shell) is None:
        unavailable(f"{shell} is not installed")
    with tempfile.TemporaryDirectory() as home:  # where ~ would point
        done = subprocess.run(
            [shell, "-c", 'set -a; . "$1"; exec env -0', shell, str(path)],
            capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin", "HOME": home},
            cwd=home,
        )  # fmt: skip
    assert done.returncode == 0 and not done.stderr, done.stderr
    return _env0(done.stdout)


def _env0(data: bytes) -> dict[str, str]:
    pairs = (item.decode().split("=", 1) for item in data.split(b"\0") if item)
    return {k: v for k, v in pairs if k.startswith(PREFIX) or k.startswith("V_")}


_USER_MANAGER = """
set -eu
mkdir -p /run/systemd
mount -t tmpfs tmpfs /run/systemd  # private to this namespace: the host's is untouched
mkdir -p /run/systemd/system  # what systemd --user checks before it starts
export HOME="$1" XDG_RUNTIME_DIR="$1/run" XDG_CONFIG_HOME="$1/config"
"$2" --user >"$1/manager.log" 2>&1 &
manager=$!
trap 'kill $manager 2>/dev/null; wait $manager 2>/dev/null || true' EXIT
for _ in $(seq 200); do [ -S "$XDG_RUNTIME_DIR/systemd/private" ] && break; sleep 0.05; done
systemctl --user start probe.service
"""


def systemd_reads(path: Path) -> dict[str, str]:
    """What a service with ``EnvironmentFile=FILE`` gets in its environment."""
    if os.geteuid() != 0:
        unavailable("needs root to run a systemd manager for the probe unit")
    manager = next((p for p in ("/lib/systemd/systemd", "/usr/lib/systemd/systemd")
                    if os.path.exists(p)), None)  # fmt: skip
    missing = [t for t in ("systemctl", "unshare") if shutil.which(t) is None]
    if manager is None or missing:
        unavailable(f"systemd or {missing or 'its manager binary'} not installed")
    with tempfile.TemporaryDirectory() as top:
        out = Path(top) / "env.out"
        if os.path.isdir("/run/systemd/system") and shutil.which("systemd-run"):
            done = subprocess.run(
                ["systemd-run", "--quiet", "--wait", "--collect", "--pipe",
                 "-p", f"EnvironmentFile={path}", "/usr/bin/env", "-0"],
                capture_output=True, timeout=60,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            return _env0(done.stdout)
        units = Path(top) / "config" / "systemd" / "user"
        units.mkdir(parents=True)
        (Path(top) / "run").mkdir(mode=0o700)
        (units / "probe.service").write_text(
            f"[Service]\nType=oneshot\nEnvironmentFile={path}\n"
            f"ExecStart=/usr/bin/env -0\nStandardOutput=file:{out}\n"
        )
        done = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", _USER_MANAGER,
             "sh", top, manager],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        log_path = Path(top) / "manager.log"
        log = log_path.read_text() if log_path.exists() else ""
        if done.returncode != 0 or not out.exists():
            unavailable(
                f"a systemd user manager could not run the probe unit here: {done.stderr[-300:]}"
                f" {log[-300:]}"
            )
        return _env0(out.read_bytes())


def docker_model_reads(text: str, *, trim_quotes: bool) -> dict[str, str]:
    """Docker's --env-file, as docker/cli's pkg/kvfile parses it (documented there):

    valid UTF-8 or an error; a BOM at the start removed; lines split at "\\n" with a
    "\\r" before it dropped (Go's bufio.ScanLines), longer than 64 KiB an error; leading
    whitespace removed; empty lines and lines starting with "#" skipped; KEY=VALUE split
    at the first "=", a KEY with a space or tab an error, a line without "=" taken from
    the environment (skipped here); VALUE kept as it is: quotes, backslashes, "$" and
    trailing whitespace included. Newer docker/cli (``trim_quotes``; its pull request
    6046) removes one pair of matching quotes around the whole value, with no escapes.
    """
    text = text.removeprefix("\ufeff")
    found: dict[str, str] = {}
    for raw in text.split("\n")[:-1] if text.endswith("\n") else text.split("\n"):
        assert len(raw.encode()) < 64 * 1024, "Docker: bufio.Scanner: token too long"
        line = raw.removesuffix("\r").lstrip(" \t\n\v\f\r\x85\xa0")
        if not line or line.startswith("#"):
            continue
        key, has_value, value = line.partition("=")
        assert key and not any(c in key for c in " \t"), f"Docker refuses the line {line!r}"
        if not has_value:
            continue
        if trim_quotes and len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        found[key] = value
    return found


class _Engine(BaseHTTPRequestHandler):
    """Just enough of the Docker engine API for ``docker create``: it records the Env."""

    protocol_version = "HTTP/1.1"
    created: list[list[str]]

    def _answer(self, status: int, body: bytes = b"") -> None:
        self.send_response(status)
        for name, value in (("Api-Version", "1.41"), ("OSType", "linux"),
                            ("Content-Type", "application/json"),
                            ("Content-Length", str(len(body)))):  # fmt: skip
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
        self._answer(200)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(200, b"OK")

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if "/containers/create" not in self.path:
            self._answer(404, b'{"message": "not in this stand-in"}')
            return
        self.created.append(json.loads(body)["Env"] or [])
        self._answer(201, json.dumps({"Id": "0" * 64, "Warnings": []}).encode())

    def address_string(self) -> str:
        return "docker-cli"

    def log_message(self, *args: object) -> None:
        pass


def docker_cli_reads(path: Path) -> dict[str, str]:
    """What the real ``docker`` CLI puts in a container's Env for ``--env-file FILE``."""
    docker = shutil.which("docker")
    if docker is None:  # CI has no docker: the model above is then the only Docker reader
        pytest.skip("no docker CLI here; Docker's rules are checked as documented (model)")
    with tempfile.TemporaryDirectory(prefix="tb-docker-", dir="/tmp") as top:
        sock = Path(top) / "engine.sock"
        created: list[list[str]] = []
        handler = type("Engine", (_Engine,), {"created": created})

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        serving = ServerThread(Server(str(sock), handler)).start()
        try:
            done = subprocess.run(
                [docker, "-H", f"unix://{sock}", "create", "--env-file", str(path),
                 "example.invalid/none"],
                capture_output=True, text=True, timeout=60,
                env={"PATH": "/usr/bin:/bin", "HOME": top, "DOCKER_CONFIG": top},
            )  # fmt: skip
        finally:
            serving.stop()
    assert done.returncode == 0 and len(created) == 1, done.stderr
    return dict(item.split("=", 1) for item in created[0])


READERS: dict[str, Callable[[Path], dict[str, str]]] = {
    "dash": lambda p: shell_reads("dash", p),
    "bash": lambda p: shell_reads("bash", p),
    "systemd": systemd_reads,
    "docker-keeps-quotes": lambda p: docker_model_reads(p.read_text(), trim_quotes=False),
    "docker-trims-quotes": lambda p: docker_model_reads(p.read_text(), trim_quotes=True),
    "docker-cli": docker_cli_reads,
}


# Two systemd managers of root at once (one per xdist worker) contend for the same cgroup
# and one of them fails its probe unit: the systemd reader runs on the worker that boots
# the nspawn container, one systemd at a time.
@pytest.fixture(
    params=[
        pytest.param(name, marks=pytest.mark.xdist_group("nspawn")) if name == "systemd" else name
        for name in READERS
    ]
)
def reader(request: pytest.FixtureRequest) -> Callable[[Path], dict[str, str]]:
    return READERS[request.param]


# -- what is written, and what each reader reads ---------------------------------------


def taken(token: str, **extra: str) -> TokenExport:
    headers = {"Authorization": f"Bearer {token}", "x-api-key": "0a1b2c3d4e5f",
               "x-gw-ims-org-id": "4A5B6C7D8E9F0A1B2C3D4E5F@AdobeOrg", **extra}  # fmt: skip
    return TokenExport(name="adobe", access_token=token, expires_at="2027-01-15T08:59:00Z",
                       expires_in=3540.0, client_id="0a1b2c3d4e5f", headers=headers)  # fmt: skip


TOKENS = [
    "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln-bmF0_dXJl",  # a JWT
    "demo-AbC_dEf-123",
    "a-b.c_d~e+f/g==",  # every character of RFC 6750's b64token, padding at the end
    "x" * 32 * 1024,  # the longest token the broker accepts
]


def test_every_reader_reads_what_the_broker_means(reader, tmp_path):
    for i, token in enumerate(TOKENS):
        meant = variables(taken(token, **{"x-sandbox-name": "prod-1", "x-proxy": "a@b:c,d%e"}))
        path = tmp_path / f"token-{i}.env"
        path.write_text(env_file(meant))
        assert reader(path) == meant


def every_single_character() -> dict[str, str]:
    """Each printable ASCII character (and space, tab, a non-ASCII letter) at the start,
    inside, at the end and after a colon of a value."""
    e_acute = unicodedata.lookup("LATIN SMALL LETTER E WITH ACUTE")
    chars = [chr(i) for i in range(0x21, 0x7F)] + [" ", "\t", e_acute]
    shapes = ("{c}a", "a{c}b", "a{c}", "a:{c}b", "{c}")
    values = [shape.format(c=c) for c in chars for shape in shapes]
    return {f"V_{i}": value for i, value in enumerate(values)}


def test_what_env_file_accepts_every_reader_reads_byte_for_byte(reader, tmp_path):
    """The allowed characters, proved against the readers: every value env_file takes is
    read back unchanged by each (and a sourced file runs nothing)."""
    accepted = {}
    for name, value in every_single_character().items():
        try:
            env_file({name: value})
        except EnvFileError:
            continue
        accepted[name] = value
    assert len(accepted) > 300  # letters, digits, -._~+/=:@%, in every place but two
    path = tmp_path / "all.env"
    path.write_text(env_file(accepted))
    assert reader(path) == accepted


@pytest.mark.parametrize(
    "value",
    ["x;touch${IFS}/tmp/pwned;", "a b", "a'b", 'a"b', "a\\b", "$HOME", "`id`", "a&b",
     "(a)", "a|b", "a<b", "a>b", "~", "~root", "~/x", "a:~", "a#b", "a\tb", "é", "a\nB=1"],
)  # fmt: skip
def test_values_outside_the_alphabet_are_refused_naming_the_variable(value):
    with pytest.raises(EnvFileError) as info:
        env_file({"TOKEN_BROKER_HEADER_X_NOTE": value})
    message = str(info.value)
    assert message.startswith("TOKEN_BROKER_HEADER_X_NOTE ")
    assert "use the json or headers format" in message
    if len(value) > 2:
        assert value not in message  # the message names the variable, never the value
