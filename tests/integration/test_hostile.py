"""Hostile input and secret hygiene, against the broker as a process.

Each case must end in a clean 4xx or a clear error, with the daemon still
serving afterwards; the ``start_broker`` fixture then searches everything
the broker wrote for the secret and every token it was issued.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time

import httpx
import pytest
from helpers import BrokerProcess

H = {"X-Token-Broker": "1"}


def raw(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, return everything the server answers until it closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and b"connection: close" not in chunk.lower():
                    break
        except (TimeoutError, ConnectionResetError):
            pass
    return b"".join(chunks)


def status_of(answer: bytes) -> int:
    match = re.match(rb"HTTP/1\.1 (\d{3})", answer)
    assert match, answer[:200]
    return int(match.group(1))


def still_serving(broker) -> None:
    response = httpx.get(broker.url + "/token", headers=H)
    assert response.status_code == 200, response.text


def test_oversized_headers_get_431_and_the_daemon_lives(start_broker):
    broker = start_broker()
    big = b"GET /token HTTP/1.1\r\nHost: localhost\r\nX-Token-Broker: 1\r\nX-Pad: "
    answer = raw(broker.port, big + b"a" * 200_000 + b"\r\n\r\n")
    assert status_of(answer) == 431
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(5000))
    answer = raw(broker.port, b"GET /token HTTP/1.1\r\nHost: localhost\r\n" + many + b"\r\n")
    assert status_of(answer) == 431
    still_serving(broker)


def test_oversized_bodies_are_not_read_into_memory(start_broker):
    broker = start_broker()
    body = b"x" * (20 * 1024 * 1024)
    for method, path in (("GET", "/token"), ("POST", "/v1/reload"), ("POST", "/healthz")):
        response = httpx.request(method, broker.url + path, headers=H, content=body, timeout=30)
        assert response.status_code < 500, (method, path, response.text)
    still_serving(broker)


@pytest.mark.parametrize(
    "path",
    [
        "/token/..",
        "/token/%2e%2e",
        "/token/..%2f..%2fetc%2fpasswd",
        "/token/%2e%2e%2fv1%2fcredentials",
        "/token/main%2f..%2fmain",
        "/token/main/",
        "/token//main",
        "/token/main%00",
        "/token/%ff%fe",
        "/v1/credentials/..%2fmain",
        "/v1/credentials/%2e%2e/token",
        "/token/" + "a" * 4000,
    ],
)
def test_path_tricks_in_credential_names_are_404(start_broker, path):
    broker = start_broker()
    answer = raw(
        broker.port,
        f"GET {path} HTTP/1.1\r\nHost: localhost\r\nX-Token-Broker: 1\r\n\r\n".encode(),
    )
    assert status_of(answer) in (404, 405), answer[:300]
    body = answer.split(b"\r\n\r\n", 1)[1]
    assert len(body) < 400  # the name is quoted bounded, not echoed whole
    still_serving(broker)


def test_non_utf8_bytes_in_the_request_get_a_clean_4xx(start_broker):
    broker = start_broker()
    for request in (
        b"GET /token/\xff\xfe HTTP/1.1\r\nHost: localhost\r\nX-Token-Broker: 1\r\n\r\n",
        b"GET /token HTTP/1.1\r\nHost: local\xffhost\r\nX-Token-Broker: 1\r\n\r\n",
        b"GET /token HTTP/1.1\r\nHost: localhost\r\nX-Token-Broker: \xff\r\n"
        b"Authorization: \xfe\r\n\r\n",
        b"\xff\xfe\xfd\r\n\r\n",
        b"GET /token HTTP/1.1\r\nHost: localhost\r\nX-Token\xff: 1\r\n\r\n",
    ):
        answer = raw(broker.port, request)
        code = status_of(answer)
        assert 400 <= code < 500 or code == 200, answer[:300]
    still_serving(broker)


def test_a_thousand_unknown_names_are_counted_not_labelled(start_broker):
    broker = start_broker()
    with httpx.Client(base_url=broker.url, headers=H) as client:
        for i in range(1000):
            response = client.get(f"/token/nobody-{i}")
            assert response.status_code == 404
            assert response.json()["error"] == "unknown_credential"
        metrics = client.get("/metrics").text
    assert "nobody-" not in metrics
    assert "token_broker_unknown_credential_requests_total 1000" in metrics
    still_serving(broker)


def test_slow_loris_connections_are_cut_and_do_not_block_others(start_broker):
    broker = start_broker(server='header_timeout = "1s"')
    slow = []
    for _ in range(50):
        sock = socket.create_connection(("127.0.0.1", broker.port))
        sock.sendall(b"GET /token HTTP/1.1\r\nHost: local")
        slow.append(sock)
    idle = [socket.create_connection(("127.0.0.1", broker.port)) for _ in range(50)]
    # A keep-alive connection: one whole request, then a second that never ends.
    kept = socket.create_connection(("127.0.0.1", broker.port))
    kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
    first = b""
    while not first.endswith(b'{"status":"ok"}'):  # headers and body may come apart
        first += kept.recv(65536)
    assert status_of(first) == 200
    kept.sendall(b"GET /token HTTP/1.1\r\nHost: loc")
    slow.append(kept)
    started = time.monotonic()
    still_serving(broker)  # others are served while the slow ones dribble
    assert time.monotonic() - started < 1.0
    for sock in slow:
        sock.sendall(b"h")  # a byte now and then does not extend the deadline
    for sock in slow:  # each recv waits (up to 5 s) for the broker's 408
        sock.settimeout(5)
        answer = sock.recv(65536)
        assert status_of(answer) == 408
        assert sock.recv(65536) == b""  # then closed
        sock.close()
    for sock in idle:
        sock.settimeout(5)
        assert sock.recv(65536) == b""  # never started a request: simply closed
        sock.close()
    still_serving(broker)


def test_malformed_and_non_utf8_configs_are_clear_errors_at_start_and_reload(
    start_broker, tmp_path
):
    for content, expected in (
        (b'[server\nlisten = "x"', "not valid TOML"),
        (b'[server]\nlisten = ["127.0.0.1:1"]\n\xff\xfe = 1\n', "not UTF-8 text"),
        (b"[credentials.a]\nprovider = 1\n", "[credentials.a] provider"),
    ):
        bad = tmp_path / "bad.toml"
        bad.write_bytes(content)
        done = subprocess.run(
            [sys.executable, "-m", "broker", "serve", "--config", str(bad)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 1
        assert str(bad) in done.stderr and expected in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    broker = start_broker()
    good = broker.proc.config.read_bytes()
    token = httpx.get(broker.url + "/token", headers=H).text
    broker.proc.config.write_bytes(good + b"\n\xff\xfe\n")
    refused = httpx.post(broker.url + "/v1/reload", headers=H)
    assert refused.status_code == 400 and "not UTF-8" in refused.json()["detail"]
    assert httpx.get(broker.url + "/token", headers=H).text == token  # the running state stays


def test_an_issuer_that_echoes_the_secret_does_not_leak_it(start_broker, issuer):
    issuer.issuer.mode = "echo"
    broker = start_broker(wait=False, args=("--log-format", "json"))
    broker.proc.wait_healthy(broker.url)
    deadline = time.monotonic() + 10
    while "invalid_request" not in broker.proc.output():
        assert time.monotonic() < deadline, broker.proc.output()
        time.sleep(0.05)
    status = httpx.get(broker.url + "/v1/credentials/main", headers=H).json()
    assert status["last_error"]["error"] == "invalid_request"
    assert "[redacted]" in status["last_error"]["description"]
    unavailable = httpx.get(broker.url + "/token", headers=H)
    assert unavailable.status_code == 503
    for text in (json.dumps(status), unavailable.text, httpx.get(broker.url + "/metrics").text):
        assert broker.secret not in text
    # The fixture searches the log for the secret at teardown.


def test_json_logs_carry_one_event_per_refresh_and_failure(start_broker, issuer):
    broker = start_broker(args=("--log-format", "json"), refresh='retry_initial = "0.2s"')
    still_serving(broker)  # the first refresh is done
    issuer.issuer.mode = "error500"
    forced = httpx.post(broker.url + "/v1/credentials/main/refresh", headers=H)
    assert forced.status_code == 502
    issuer.issuer.mode = "ok"
    deadline = time.monotonic() + 10
    while httpx.get(broker.url + "/v1/credentials/main", headers=H).json()["state"] != "fresh":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    broker.proc.stop()
    lines = [json.loads(line) for line in broker.proc.output().splitlines() if line.strip()]
    events = [line for line in lines if line.get("event")]
    ok = [e for e in events if e["event"] == "refresh_ok"]
    failed = [e for e in events if e["event"] == "refresh_failed"]
    assert len(ok) >= 2 and len(failed) >= 1, broker.proc.output()
    for event in ok + failed:
        assert event["credential"] == "main"
        assert re.fullmatch(r"[0-9a-f]{16}", event["x_debug_id"])
        assert event["time"].endswith("Z") and event["level"] in ("info", "warning")
    assert failed[0]["status"] == 500 and failed[0]["error"] == "internal_error"
    # No access log by default: nothing mentions the token route.
    assert not any("/token" in line["message"] for line in lines)


def test_access_log_when_asked_names_routes_never_tokens(start_broker):
    broker = start_broker(server="access_log = true")
    token = httpx.get(broker.url + "/token", headers=H).text
    httpx.get(broker.url + f"/token?x={token}", headers=H)
    httpx.get(broker.url + "/token/nope", headers=H)
    broker.proc.stop()
    out = broker.proc.output()
    assert re.search(r"broker\.access: GET /token 200 peer=127\.0\.0\.1 client=- [\d.]+ms", out)
    assert "GET /token/nope 404" in out
    assert token not in out


def test_metrics_show_latency_expiry_state_and_last_refresh(start_broker):
    broker = start_broker()
    httpx.get(broker.url + "/token", headers=H)
    text = httpx.get(broker.url + "/metrics").text
    assert 'token_broker_token_requests_total{credential="main",outcome="ok"} 1' in text
    assert 'token_broker_refreshes_total{credential="main",outcome="success"} 1' in text
    count = re.search(
        r'token_broker_issuer_request_duration_seconds_count\{credential="main"\} (\d+)', text
    )
    assert count and int(count.group(1)) == 1
    assert (
        'token_broker_issuer_request_duration_seconds_bucket{credential="main",le="+Inf"} 1' in text
    )
    left = re.search(r'token_broker_token_expires_in_seconds\{credential="main"\} (\d+)', text)
    assert left and 3500 < int(left.group(1)) <= 3600
    assert 'token_broker_credential_state{credential="main",state="fresh"} 1' in text
    last = re.search(
        r'token_broker_last_refresh_timestamp_seconds\{credential="main"\} (\d+)', text
    )
    assert last and abs(int(last.group(1)) - time.time()) < 60
    assert broker.secret not in text


def test_the_daemon_cannot_dump_core(start_broker, tmp_path):
    broker = start_broker()
    pid = broker.proc.proc.pid
    with open(f"/proc/{pid}/limits") as f:
        limits = f.read()
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"], core
    # Not dumpable: /proc/PID/status has no flag for it, but the kernel makes the
    # process's /proc files root-owned and refuses ptrace; ask the process itself.
    probe = subprocess.run(
        [sys.executable, "-c",
         "import ctypes,broker.server as s; s.harden(); "
         "print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert probe.stdout.strip() == "0"


def test_group_readable_secret_files_and_writable_configs_are_warned_about(start_broker):
    broker = start_broker(wait=False)
    broker.proc.stop()
    secret_file = next(broker.proc.config.parent.glob("secret-0"))
    secret_file.chmod(0o644)
    broker.proc.config.chmod(0o666)
    proc = BrokerProcess(broker.proc.config)
    try:
        proc.wait_healthy(broker.url)
    finally:
        proc.stop()
    out = proc.output()
    assert f"secret file of 'main' {secret_file} has mode 0644" in out
    assert f"run `chmod 600 {secret_file}`" in out
    assert f"config file {broker.proc.config} has mode 0666" in out
    assert f"run `chmod go-w {broker.proc.config}`" in out
    assert broker.secret not in out


def test_every_metric_the_docs_list_is_exposed(start_broker):
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "docs" / "observability.md").read_text()
    table = readme.split("## Metrics", 1)[1].split("Series that appear only", 1)[0]
    listed = re.findall(r"^\| `(token_broker_\w+)` \| (\w+) \|", table, re.M)
    assert len(listed) == 8
    broker = start_broker()
    httpx.get(broker.url + "/token", headers=H)
    httpx.get(broker.url + "/token/nope", headers=H)
    httpx.get(broker.url + "/token")  # refused: no header
    text = httpx.get(broker.url + "/metrics").text
    for name, kind in listed:
        assert f"# TYPE {name} {kind}" in text, name
        assert re.search(rf"^{name}(_bucket|_sum|_count)?[{{ ]", text, re.M), name
    # The alert rules use only listed metrics.
    rules = readme.split("Two alert rules", 1)[1].split("```", 2)[1]
    used = set(re.findall(r"token_broker_\w+", rules))
    assert used and used <= {name for name, _ in listed}
