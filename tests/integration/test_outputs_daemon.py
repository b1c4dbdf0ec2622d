"""File outputs against the broker as a process: through many refreshes, reloads and failures."""

from __future__ import annotations

import grp
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import httpx
from helpers import HEADERS, ServerThread, wait_for


def outputs_toml(tmp_path: Path, *tables: str) -> str:
    return "\n".join(f'[[outputs]]\ncredential = "main"\n{t}\n' for t in tables)


def test_outputs_are_written_whole_with_their_mode_through_many_refreshes(
    start_broker, issuer, tmp_path
):
    issuer.issuer.lifetime = 3.0  # a refresh every ~2 s
    group = grp.getgrgid(os.getgid()).gr_name
    out = tmp_path / "out"
    out.mkdir()
    marker = tmp_path / "ran"
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, sys\n"
        "with open(sys.argv[1], 'a') as f: f.write(os.environ['TOKEN_BROKER_OUTPUT'] + '\\n')\n"
    )
    extra = outputs_toml(
        tmp_path,
        f'path = "{out}/token"\nmode = "0640"\ngroup = "{group}"\n'
        f'command = ["{sys.executable}", "{probe}", "{marker}"]',
        f'path = "{out}/token.json"\nformat = "json"',
        f'path = "{out}/headers.json"\nformat = "headers"',
        f'path = "{out}/token.env"\nformat = "env"',
    )
    broker = start_broker(
        credential='headers = { "x-sandbox-name" = "prod" }', extra=extra, wait=False
    )
    broker.proc.wait_healthy(broker.url)
    target = out / "token"
    wait_for(target.exists, what="the first write")

    # Watch the file from another thread through several refreshes: every look sees a
    # whole token the issuer handed out, with exactly the mode asked, never looser.
    seen: set[str] = set()
    problems: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                fd = os.open(target, os.O_RDONLY)
            except FileNotFoundError:
                problems.append("the file was missing for a moment")
                continue
            try:
                mode = stat.S_IMODE(os.fstat(fd).st_mode)
                data = os.read(fd, 65536).decode()
            finally:
                os.close(fd)
            if mode != 0o640:
                problems.append(f"mode {mode:o}")
            if not data.endswith("\n") or data[:-1] not in issuer.issuer.issued:
                problems.append(f"partial or unknown content {data[:20]!r}")
            seen.add(data)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        wait_for(lambda: len(seen) >= 5, timeout=30, what="five tokens in the file")
    finally:
        stop.set()
        watcher.join()
    assert not problems, problems[:5]
    assert target.stat().st_gid == os.getgid()

    current = httpx.get(broker.url + "/token", headers=HEADERS).text
    wait_for(lambda: target.read_text() == current + "\n", what="the file to follow")
    wait_for(
        lambda: json.loads((out / "token.json").read_text())["access_token"] == current,
        what="the json output",
    )
    headers = json.loads((out / "headers.json").read_text())
    assert headers["x-sandbox-name"] == "prod" and headers["x-api-key"] == "broker-client"
    # The same headers the API route gives (and so BrokerAuth, and exec's variables).
    route = httpx.get(broker.url + "/v1/credentials/main/headers", headers=HEADERS).json()
    assert route["x-sandbox-name"] == "prod" and set(route) == set(headers)
    env = dict(line.split("=", 1) for line in (out / "token.env").read_text().splitlines())
    assert env["TOKEN_BROKER_HEADER_X_SANDBOX_NAME"] == "prod"
    assert env["TOKEN_BROKER_ORG_ID"] == "ABC@AdobeOrg"
    for path in out.iterdir():  # 0600 unless asked otherwise; no temporary file left over
        assert stat.S_IMODE(path.stat().st_mode) == (0o640 if path == target else 0o600)
    wait_for(  # the command runs after every write
        lambda: marker.read_text().count(f"{target}\n") >= 5, what="a command per write"
    )
    metrics = httpx.get(broker.url + "/metrics").text
    assert f'token_broker_output_writes_total{{path="{target}",outcome="ok"}}' in metrics
    assert f'token_broker_output_commands_total{{path="{target}",outcome="ok"}}' in metrics


def test_a_failing_output_is_logged_counted_and_retried_while_serving_goes_on(
    start_broker, issuer, tmp_path
):
    issuer.issuer.lifetime = 3.0
    out = tmp_path / "out"
    out.mkdir()
    broker = start_broker(extra=outputs_toml(tmp_path, f'path = "{out}/token"'))
    wait_for((out / "token").exists, what="the first write")
    shutil.rmtree(out)  # the directory goes away: writes fail
    wait_for(lambda: "not written" in broker.proc.output(), timeout=10, what="the failure")
    for _ in range(20):
        assert httpx.get(broker.url + "/token", headers=HEADERS).status_code == 200
    metrics = httpx.get(broker.url + "/metrics").text
    assert f'token_broker_output_writes_total{{path="{out}/token",outcome="error"}}' in metrics
    out.mkdir()  # back: the next refresh writes again
    wait_for((out / "token").exists, timeout=10, what="the write after the failure")
    failures = broker.proc.output().count("not written")
    assert 1 <= failures <= 4  # once per failed attempt (one per refresh), not per second


def test_reload_adds_changes_and_removes_outputs(start_broker, issuer, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    broker = start_broker(extra=outputs_toml(tmp_path, f'path = "{out}/a"', f'path = "{out}/b"'))
    wait_for(lambda: (out / "a").exists() and (out / "b").exists(), what="the first writes")
    config = broker.proc.config.read_text()
    config = config.replace(f'path = "{out}/b"', f'path = "{out}/b"\nformat = "json"')
    config = config.replace(f'path = "{out}/a"', f'path = "{out}/c"')
    broker.proc.config.write_text(config)
    answer = httpx.post(broker.url + "/v1/reload", headers=HEADERS)
    assert answer.status_code == 200, answer.text
    wait_for(lambda: (out / "c").exists(), what="the added output")
    wait_for(lambda: (out / "b").read_text().startswith("{"), what="the changed output")
    wait_for(lambda: not (out / "a").exists(), what="the removed output's file to go")
    token = httpx.get(broker.url + "/token", headers=HEADERS).text
    assert (out / "c").read_text() == token + "\n"


def test_metrics_pass_promtools_own_check(start_broker, issuer, tmp_path):
    """/metrics, with every family populated, as Prometheus's promtool lints it."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI") == "true":
            raise AssertionError("CI installs promtool (Debian package prometheus)")
        import pytest

        pytest.skip("promtool is not installed (Debian package prometheus)")
    out = tmp_path / "out"
    out.mkdir()
    broker = start_broker(extra=outputs_toml(tmp_path, f'path = "{out}/a"\ncommand = ["true"]'))
    wait_for((out / "a").exists, what="the output")
    httpx.get(broker.url + "/token", headers=HEADERS)
    httpx.get(broker.url + "/token/nobody", headers=HEADERS)
    httpx.get(broker.url + "/token")  # refused: no header

    def scrape() -> str:
        text = httpx.get(broker.url + "/metrics").text
        return text if "token_broker_output_commands_total{" in text else ""

    text = wait_for(scrape, what="every family to have a sample")
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0 and not checked.stdout.strip(), checked.stdout + checked.stderr


class ChosenTokenIssuer:
    """An issuer on loopback that answers every token request with ``token``."""

    def __init__(self, token: str) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        body = json.dumps({"access_token": token, "token_type": "bearer", "expires_in": 3600})
        self.calls = 0
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                issuer.calls += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        self._serving = ServerThread(server).start()

    def stop(self) -> None:
        self._serving.stop()


def test_a_token_that_a_shell_would_run_is_refused_and_never_written(
    start_broker, issuer, tmp_path
):
    """The issuer chooses the token; sourced from an env file, this one would run `touch`."""
    marker = tmp_path / "ran"
    hostile = ChosenTokenIssuer(f"x;touch${{IFS}}{marker};")
    out = tmp_path / "out"
    out.mkdir()
    env = out / "token.env"
    try:
        broker = start_broker(
            extra=outputs_toml(tmp_path, f'path = "{env}"\nformat = "env"'),
            issuer_url=hostile.url,
        )

        def last_error() -> str:
            status = httpx.get(broker.url + "/v1/credentials/main", headers=HEADERS).json()
            return (status.get("last_error") or {}).get("error", "")

        wait_for(lambda: last_error() or env.exists(), what="the answer taken or refused")
        if env.exists():  # what a unit's ExecStartPre or a shell script does with it
            subprocess.run(["sh", "-c", f'set -a; . "{env}"'], capture_output=True, timeout=30)
        assert not marker.exists(), "sourcing the env output ran the issuer's command"
        assert last_error() == "invalid_response" and not env.exists()
        assert httpx.get(broker.url + "/token", headers=HEADERS).status_code == 503
    finally:
        hostile.stop()


def live_members(group: int) -> list[int]:
    """Live (not zombie) processes of process group ``group``, from /proc."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            found.append(int(entry))
    return found


def test_stopping_the_daemon_ends_a_running_output_command_and_its_children(
    start_broker, issuer, tmp_path
):
    """SIGTERM while an output's command runs (``sh -c 'sleep 300; :'``): the daemon exits
    at once, cleanly, and leaves no process of that command behind."""
    import signal

    out = tmp_path / "out"
    out.mkdir()
    group_file = tmp_path / "group"
    script = f'echo $$ > "{group_file}"; sleep 300; :'
    command = json.dumps(["sh", "-c", script])
    table = f'path = "{out}/token"\ncommand = {command}'
    broker = start_broker(extra=outputs_toml(tmp_path, table))
    group = int(wait_for(lambda: group_file.exists() and group_file.read_text().strip(),
                         what="the command to start"))  # fmt: skip
    try:
        assert live_members(group)
        assert broker.proc.stop() == 0  # SIGTERM; within the 10 s it allows
        wait_for(lambda: not live_members(group), what="the command's children to be gone")
    finally:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
