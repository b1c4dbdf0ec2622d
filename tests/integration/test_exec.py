"""`token-broker exec` as a process, with real commands, against the broker as a process.

No config file anywhere: the broker is found through $TOKEN_BROKER_URL, as a
tool's environment would have it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from helpers import HEADERS, reserve_port

from broker.access import key_digest, new_key

PRINT_ENV = "import json, os; print(json.dumps(dict(os.environ)))"


def exec_env(tmp_path: Path, url: str, **extra: str) -> dict[str, str]:
    """This process's environment without any token-broker variable, no config reachable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKEN_BROKER_")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "no-config"), TOKEN_BROKER_URL=url, **extra)
    return env


def run_exec(
    args: list[str], env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", "exec", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def child_env(args: list[str], env: dict[str, str]) -> dict[str, str]:
    """The environment the command saw."""
    r = run_exec([*args, "--", sys.executable, "-c", PRINT_ENV], env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def token_json(url: str, name: str = "main") -> dict[str, object]:
    return httpx.get(f"{url}/v1/credentials/{name}/token", headers=HEADERS).json()


def test_default_variables_of_an_adobe_credential(start_broker, issuer, tmp_path):
    b = start_broker()
    seen = child_env([], exec_env(tmp_path, b.url))
    now = token_json(b.url)
    assert seen["TOKEN_BROKER_ACCESS_TOKEN"] == now["access_token"]
    assert seen["TOKEN_BROKER_EXPIRES_AT"] == now["expires_at"]
    assert seen["TOKEN_BROKER_API_KEY"] == "broker-client"
    assert seen["TOKEN_BROKER_ORG_ID"] == "ABC@AdobeOrg"
    assert not [k for k in seen if k.startswith("TOKEN_BROKER_HEADER_")]


def test_exec_through_the_config_sends_the_header_it_requires(start_broker, tmp_path):
    """A config whose require_header is not X-Token-Broker: exec finds the daemon by the
    config, as token and list do, and sends that header too."""
    b = start_broker(server='require_header = "X-Other"')
    env = exec_env(tmp_path, b.url)
    del env["TOKEN_BROKER_URL"]
    seen = child_env(["--config", str(b.proc.config)], env)
    token = httpx.get(b.url + "/token", headers={"X-Other": "1"}).text
    assert seen["TOKEN_BROKER_ACCESS_TOKEN"] == token


def test_env_adds_variables_to_the_defaults(start_broker, issuer, tmp_path):
    b = start_broker()
    args = ["main", "--env", "AUTH=authorization", "--env", "API=api_key", "--env", "T=expires_at"]
    seen = child_env(args, exec_env(tmp_path, b.url))
    token = seen["TOKEN_BROKER_ACCESS_TOKEN"]
    assert seen["AUTH"] == f"Bearer {token}"
    assert seen["API"] == "broker-client" and seen["T"] == seen["TOKEN_BROKER_EXPIRES_AT"]


def test_an_oauth2_credential_has_no_adobe_variables(start_broker, issuer, tmp_path):
    b = start_broker(provider="oauth2")
    env = exec_env(tmp_path, b.url)
    seen = child_env(["--env", "ID=api_key"], env)
    assert "TOKEN_BROKER_API_KEY" not in seen and "TOKEN_BROKER_ORG_ID" not in seen
    assert seen["ID"] == "broker-client"  # api_key is the client_id
    marker = tmp_path / "ran"
    r = run_exec(["--env", "O=org_id", "--", "touch", str(marker)], env)
    assert r.returncode == 1 and not marker.exists()
    assert r.stderr == (
        "token-broker: credential 'main' has no org_id (asked for by --env O=org_id); "
        "the command was not run\n"
    )


def test_the_exit_status_is_the_commands(start_broker, issuer, tmp_path):
    b = start_broker()
    env = exec_env(tmp_path, b.url)
    assert run_exec(["--", "sh", "-c", "exit 7"], env).returncode == 7
    r = run_exec(["--", "sh", "-c", 'echo "out $TOKEN_BROKER_API_KEY"; echo err >&2'], env)
    assert (r.returncode, r.stdout, r.stderr) == (0, "out broker-client\n", "err\n")
    # Death by a signal: a shell sees 128+signo, as if the command had run without exec.
    script = f'"{sys.executable}" -m broker exec -- sh -c \'kill -TERM $$\'; echo "status=$?"'
    shell = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True)
    assert shell.stdout == f"status={128 + signal.SIGTERM}\n"
    assert run_exec(["--", "no-such-command-here"], env).returncode == 127


def test_a_broken_pipe_ends_the_command(start_broker, issuer, tmp_path):
    """Python ignores SIGPIPE; the command must not inherit that, or this loop never ends."""
    b = start_broker()
    loop = "while :; do echo y; done"
    script = f'"{sys.executable}" -m broker exec -- sh -c "{loop}" | head -n 2'
    proc = subprocess.Popen(
        ["sh", "-c", script], env=exec_env(tmp_path, b.url), stdout=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group, so a hang can be ended whole
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError("the command kept writing to a closed pipe") from None
    assert out == "y\ny\n"


REPORT_SIGNAL = textwrap.dedent(
    """
    import os, signal, sys, time
    out = sys.argv[1]
    def report(signo, frame):
        with open(out + ".tmp", "w") as f:
            f.write(signal.Signals(signo).name)
        os.rename(out + ".tmp", out)
        sys.exit(0)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, report)
    with open(out + ".ready.tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(out + ".ready.tmp", out + ".ready")
    while True:
        time.sleep(1)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signals_reach_the_command(start_broker, issuer, tmp_path, sig):
    b = start_broker()
    child = tmp_path / "child.py"
    child.write_text(REPORT_SIGNAL)
    report = tmp_path / "report"
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "exec", "--", sys.executable, str(child), str(report)],
        env=exec_env(tmp_path, b.url),
    )
    try:
        ready = Path(f"{report}.ready")
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None, f"exec exited {proc.returncode}"
            assert time.monotonic() < deadline, "the command did not start"
            time.sleep(0.05)
        assert int(ready.read_text()) == proc.pid  # exec became the command
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert report.read_text() == sig.name


def test_the_client_key_is_not_passed_on_unless_asked(start_broker, issuer, tmp_path):
    key = new_key()
    b = start_broker(
        extra=f'[clients.ci]\nkey_sha256 = "{key_digest(key).hex()}"\ncredentials = ["*"]\n'
    )
    env = exec_env(tmp_path, b.url, TOKEN_BROKER_CLIENT_KEY=key)
    seen = child_env([], env)
    assert seen["TOKEN_BROKER_ACCESS_TOKEN"] and "TOKEN_BROKER_CLIENT_KEY" not in seen
    assert key not in json.dumps(seen)
    assert child_env(["--pass-key"], env)["TOKEN_BROKER_CLIENT_KEY"] == key
    key_file = tmp_path / "client.key"
    key_file.write_text(key + "\n")
    env = exec_env(tmp_path, b.url, TOKEN_BROKER_CLIENT_KEY_FILE=str(key_file))
    assert "TOKEN_BROKER_CLIENT_KEY_FILE" not in child_env([], env)
    assert child_env(["--pass-key"], env)["TOKEN_BROKER_CLIENT_KEY_FILE"] == str(key_file)
    # Without a key the broker refuses: one sentence, nothing run.
    marker = tmp_path / "ran"
    r = run_exec(["--", "touch", str(marker)], exec_env(tmp_path, b.url))
    assert r.returncode == 1 and not marker.exists()
    assert "401 unauthorized" in r.stderr and r.stderr.count("\n") == 1


def test_errors_before_the_command_runs_do_not_run_it(start_broker, issuer, tmp_path):
    marker = tmp_path / "ran"
    touch = ["--", "touch", str(marker)]
    down = f"http://127.0.0.1:{reserve_port()}"
    r = run_exec(touch, exec_env(tmp_path, down))
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"token-broker: cannot reach the token broker at {down} (")
    b = start_broker()
    r = run_exec(["nope", *touch], exec_env(tmp_path, b.url))
    assert r.returncode == 1 and "unknown_credential" in r.stderr and r.stderr.count("\n") == 1
    for usage in (["--env", "lowercase-is-not=access_token", *touch], ["--env", "X=secret", *touch],
                  ["--min-remaining", "soon", *touch], ["main", "touch", str(marker)]):  # fmt: skip
        r = run_exec(usage, exec_env(tmp_path, b.url))
        assert r.returncode == 2, (usage, r.stderr)
    assert not marker.exists()


def test_min_remaining_refreshes_a_token_that_has_too_little_left(start_broker, issuer, tmp_path):
    """16 s tokens, refreshed by the scheduler only at 90 % of their life (14.4 s)."""
    issuer.issuer.lifetime = 16
    b = start_broker(refresh="at = 0.95\njitter = 0", server="access_log = true")
    env = exec_env(tmp_path, b.url)
    forced = "POST /v1/credentials/main/refresh "
    first = token_json(b.url)
    # Fresh: 16 s left, more than the default 10m capped at half the lifetime (8 s).
    assert child_env([], env)["TOKEN_BROKER_ACCESS_TOKEN"] == first["access_token"]
    assert b.proc.output().count(forced) == 0
    # Wait (on the broker's own answer) until less than half the lifetime is left.
    deadline = time.monotonic() + 30
    while int(token_json(b.url)["expires_in"]) > 6:  # type: ignore[call-overload]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    calls = issuer.issuer.calls
    seen = child_env([], env)
    assert seen["TOKEN_BROKER_ACCESS_TOKEN"] != first["access_token"]
    assert seen["TOKEN_BROKER_ACCESS_TOKEN"] == token_json(b.url)["access_token"]
    assert issuer.issuer.calls == calls + 1
    assert b.proc.output().count(forced) == 1  # exec's, not the scheduler's
    # A long --min-remaining is capped the same way: a 3600 s token is not refreshed.
    issuer.issuer.lifetime = 3600
    long = start_broker(server="access_log = true")
    token_json(long.url)  # waits for the first token
    calls = issuer.issuer.calls
    child_env(["--min-remaining", "2h"], exec_env(tmp_path, long.url))
    assert issuer.issuer.calls == calls and long.proc.output().count(forced) == 0
