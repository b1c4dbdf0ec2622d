"""Credentials in a real Secret Service: add, serve, rotate under load, remove, and failures.

gnome-keyring runs on a private D-Bus session (fixture ``keyring_env``); what
the keyring holds is checked with ``secret-tool``, not with our own code.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import (
    HEADERS,
    BrokerProcess,
    Repeated,
    new_secret,
    reserve_port,
    wait_for,
    write_config,
)

from broker.cli import main


def run_cli(monkeypatch, argv: list[str], stdin: str = "") -> int:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return main(argv)


def broker_config(tmp_path: Path, port: int, extra: str = "") -> Path:
    return write_config(
        tmp_path / "config.toml",
        f"""# operator's comment: keep me
[server]
listen = ["127.0.0.1:{port}"]  # loopback only

[refresh]
force_cooldown = "0s"
{extra}""",
    )


def test_add_serve_rotate_under_load_remove(issuer, keyring_env, tmp_path, monkeypatch, capsys):
    port = reserve_port()
    cfg = broker_config(tmp_path, port)
    old = new_secret()
    issuer.issuer.add_client("cid", old)
    args = ["--config", str(cfg)]

    # add: verified with one token request, stored in the keyring, config edited in place.
    rc = run_cli(monkeypatch, ["add", "kr", "--client-id", "cid", "--ims-url", issuer.url,
                               "--org-id", "ORG@AdobeOrg", "--scopes", "openid,AdobeID",
                               "--secret-stdin", *args], old + "\n")  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert issuer.issuer.calls == 1
    assert keyring_env.lookup("token-broker", "kr") == old
    text = cfg.read_text()
    assert old not in text
    assert "# operator's comment: keep me" in text and "# loopback only" in text
    assert '[credentials.kr]\nprovider = "adobe"' in text

    proc = BrokerProcess(cfg, env=keyring_env.env)
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_healthy(url)
        first = httpx.get(url + "/token/kr", headers=HEADERS)
        assert first.status_code == 200 and first.text in issuer.issuer.issued

        # A client asks for the token continuously while the secret rotates.
        def ask(client: httpx.Client) -> int | None:
            r = client.get("/token/kr")
            return None if r.status_code == 200 else r.status_code

        client = httpx.Client(base_url=url, headers=HEADERS)
        with client, Repeated(lambda: ask(client)) as load:
            new = new_secret()
            issuer.issuer.add_client("cid", new)
            assert run_cli(monkeypatch, ["rotate", "kr", "--secret-stdin", *args], new) == 0
            out = capsys.readouterr().out
            assert "rotation of kr started" in out and "the running daemon reloaded" in out
            assert keyring_env.lookup("token-broker", "kr#next") == new
            assert keyring_env.lookup("token-broker", "kr") == old
            # The cached token was not dropped by the switch.
            assert httpx.get(url + "/token/kr", headers=HEADERS).text == first.text

            # The old secret is made invalid at the issuer: refreshes still succeed.
            issuer.issuer.clients["cid"].discard(old)
            forced = httpx.post(url + "/v1/credentials/kr/refresh", headers=HEADERS)
            assert forced.status_code == 200, forced.text
            assert issuer.issuer.received[-1].form["client_secret"] == new

            assert run_cli(monkeypatch, ["rotate", "kr", "--finish", *args]) == 0
            assert keyring_env.lookup("token-broker", "kr") == new
            assert keyring_env.lookup("token-broker", "kr#next") is None
            forced = httpx.post(url + "/v1/credentials/kr/refresh", headers=HEADERS)
            assert forced.status_code == 200, forced.text
            after = load.served
            wait_for(lambda: load.served > after + 20)  # the load keeps being served after it
        assert load.failures == [] and load.served > 50

        # remove: config entry and keyring items gone. It was the last credential, and a
        # daemon with nothing to serve refuses that config (an empty file is more often a
        # truncated write): the command says so, exits 1, and the daemon is to be stopped.
        capsys.readouterr()
        assert run_cli(monkeypatch, ["remove", "kr", *args]) == 1
        said = capsys.readouterr().err
        assert "the daemon refused to reload" in said and "no credentials" in said, said
        assert keyring_env.lookup("token-broker", "kr") is None
        assert "[credentials.kr]" not in cfg.read_text()
        assert "# operator's comment: keep me" in cfg.read_text()
    finally:
        proc.stop()
    output = proc.output()
    assert old not in output and new not in output


def test_add_creates_a_0600_config_and_refuses_a_rejected_secret(
    issuer, keyring_env, tmp_path, monkeypatch, capsys
):
    cfg = tmp_path / "sub" / "config.toml"
    good = new_secret()
    issuer.issuer.add_client("cid2", good)
    argv = ["add", "a2", "--client-id", "cid2", "--ims-url", issuer.url, "--secret-stdin",
            "--config", str(cfg)]  # fmt: skip
    assert run_cli(monkeypatch, argv, "wrong-secret") == 1
    err = capsys.readouterr().err
    assert "invalid_client" in err and "the secret was not stored" in err
    assert "wrong-secret" not in err
    assert not cfg.exists() and keyring_env.lookup("token-broker", "a2") is None

    assert run_cli(monkeypatch, argv, good) == 0
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    # A duplicate name: clear error, config and keyring unchanged.
    before = cfg.read_text()
    assert run_cli(monkeypatch, argv, "other") == 1
    assert "exists already" in capsys.readouterr().err
    assert cfg.read_text() == before and keyring_env.lookup("token-broker", "a2") == good
    assert run_cli(monkeypatch, ["remove", "a2", "--config", str(cfg)]) == 0


@pytest.mark.parametrize("name", ["bad/name", "spa ce", "dots..ok?", ""])
def test_add_refuses_names_outside_the_alphabet(keyring_env, tmp_path, monkeypatch, capsys, name):
    cfg = tmp_path / "config.toml"
    argv = ["add", name, "--client-id", "c", "--no-verify", "--secret-stdin", "--config", str(cfg)]
    assert run_cli(monkeypatch, argv, "s") == 1
    assert "invalid credential name" in capsys.readouterr().err
    assert not cfg.exists()


def test_unreadable_config_is_a_clear_error_and_nothing_is_stored(
    keyring_env, tmp_path, monkeypatch, capsys
):
    cfg = tmp_path / "config.toml"
    cfg.write_bytes(b"[server\n")
    argv = ["add", "x1", "--client-id", "c", "--no-verify", "--secret-stdin", "--config", str(cfg)]
    assert run_cli(monkeypatch, argv, "s") == 1
    assert f"{cfg}: not valid TOML" in capsys.readouterr().err
    assert cfg.read_bytes() == b"[server\n"
    assert keyring_env.lookup("token-broker", "x1") is None


CONSOLE = {
    "project": {
        "id": "1234",
        "name": "migration",
        "org": {"id": "98765", "name": "Org", "ims_org_id": "ABCDEF0123456789ABCDEF01@AdobeOrg"},
        "workspace": {
            "id": "555",
            "name": "Production",
            "details": {
                "credentials": [
                    {
                        "id": "111",
                        "name": "Old JWT",
                        "integration_type": "service",
                        "jwt": {"client_id": "jwt-id", "client_secret": "jwt-secret"},
                    },
                    {
                        "id": "222",
                        "name": "User Sync (S2S)",
                        "integration_type": "oauth_server_to_server",
                        "oauth_server_to_server": {
                            "client_id": "s2s-client",
                            "client_secrets": ["S2S-SECRET-ONE", "S2S-SECRET-TWO"],
                            "technical_account_id": "TA@techacct.adobe.com",
                            "technical_account_email": "x@techacct.adobe.com",
                            "scopes": ["openid", "AdobeID", "user_management_sdk"],
                        },
                    },
                ]
            },
        },
    }
}


def test_import_console_json(issuer, keyring_env, tmp_path, monkeypatch, capsys):
    issuer.issuer.add_client("s2s-client", "S2S-SECRET-ONE")
    issuer.issuer.add_client("s2s-client", "S2S-SECRET-TWO")
    exported = tmp_path / "project.json"
    exported.write_text(json.dumps(CONSOLE))
    cfg = tmp_path / "config.toml"
    argv = ["import", str(exported), "--ims-url", issuer.url, "--delete", "--config", str(cfg)]
    assert run_cli(monkeypatch, argv) == 0
    captured = capsys.readouterr()
    assert "skipped 'Old JWT'" in captured.err and "retired by Adobe" in captured.err
    assert "imported migration (from 'User Sync (S2S)'" in captured.out  # the project's name
    assert not exported.exists()
    text = cfg.read_text()
    assert 'client_id = "s2s-client"' in text
    assert 'org_id = "ABCDEF0123456789ABCDEF01@AdobeOrg"' in text
    assert '"user_management_sdk"' in text and "S2S-SECRET" not in text
    assert keyring_env.lookup("token-broker", "migration") == "S2S-SECRET-ONE"
    assert keyring_env.lookup("token-broker", "migration#next") == "S2S-SECRET-TWO"
    assert issuer.issuer.received[-1].form["client_secret"] == "S2S-SECRET-ONE"
    # The Console ids secret cycling needs are recorded; the project lacks the API.
    assert 'credential_id = "222"' in text and 'console_org_id = "98765"' in text
    assert "does not list the I/O Management API (AdobeIOManagementAPISDK)" in captured.out
    assert run_cli(monkeypatch, ["remove", "migration", "--config", str(cfg)]) == 0
    assert keyring_env.lookup("token-broker", "migration#next") is None


def test_import_says_when_the_project_can_cycle_its_secret(
    issuer, keyring_env, tmp_path, monkeypatch, capsys
):
    issuer.issuer.add_client("s2s-client", "S2S-SECRET-ONE")
    project = json.loads(json.dumps(CONSOLE))
    details = project["project"]["workspace"]["details"]
    details["services"] = [{"code": "AdobeIOManagementAPISDK", "name": "I/O Management API"}]
    details["credentials"][1]["oauth_server_to_server"]["client_secrets"] = ["S2S-SECRET-ONE"]
    exported = tmp_path / "project.json"
    exported.write_text(json.dumps(project))
    cfg = tmp_path / "config.toml"
    argv = ["import", str(exported), "--ims-url", issuer.url, "--keep", "--json",
            "--name", "cyc", "--config", str(cfg)]  # fmt: skip
    assert run_cli(monkeypatch, argv) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["secret_cycling"]["cyc"] == {
        "credential_id": "222", "console_org_id": "98765", "management_api": True,
    }  # fmt: skip
    assert run_cli(monkeypatch, ["remove", "cyc", "--config", str(cfg)]) == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "not JSON"),
        (json.dumps({"hello": "world"}).encode(), "not an Adobe Developer Console project JSON"),
        (json.dumps({"project": {"workspace": {"details": {"credentials": [
            {"name": "Bad", "integration_type": "oauth_server_to_server",
             "oauth_server_to_server": {"client_id": "x", "client_secrets": []}}]}}}}).encode(),
         "non-empty client_secrets"),
    ],
)  # fmt: skip
def test_import_refuses_malformed_or_foreign_json(
    keyring_env, tmp_path, monkeypatch, capsys, content, message
):
    exported = tmp_path / "project.json"
    exported.write_bytes(content)
    cfg = write_config(tmp_path / "config.toml", "# untouched\n")
    assert run_cli(monkeypatch, ["import", str(exported), "--config", str(cfg)]) == 1
    assert message in capsys.readouterr().err
    assert cfg.read_text() == "# untouched\n" and exported.exists()


def test_import_with_a_duplicate_name_changes_nothing(keyring_env, tmp_path, monkeypatch, capsys):
    exported = tmp_path / "project.json"
    exported.write_text(json.dumps(CONSOLE))
    cfg = write_config(
        tmp_path / "config.toml", '[credentials.dup]\nprovider = "adobe"\nclient_id = "x"\n'
    )
    before = cfg.read_text()
    argv = ["import", str(exported), "--name", "dup", "--no-verify", "--config", str(cfg)]
    assert run_cli(monkeypatch, argv) == 1
    assert "exists already" in capsys.readouterr().err
    assert cfg.read_text() == before
    assert keyring_env.lookup("token-broker", "dup") is None


def test_reload_rejects_a_broken_config_and_keeps_serving(issuer, start_broker, capsys):
    b = start_broker()
    token = httpx.get(b.url + "/token", headers=HEADERS).text
    good = b.proc.config.read_text()
    b.proc.config.write_text(good + "\n[credentials.bad]\nprovider = 'nope'\n")
    # The CLI reads the config to find the daemon, so it reports the error itself...
    assert main(["reload", "--config", str(b.proc.config)]) == 1
    assert "[credentials.bad] provider" in capsys.readouterr().err
    # ...and the daemon refuses it whole, by HTTP and by SIGHUP, and keeps serving.
    r = httpx.post(b.url + "/v1/reload", headers=HEADERS)
    assert r.status_code == 400 and r.json()["error"] == "config_error"
    assert "[credentials.bad] provider" in r.json()["detail"]
    b.proc.proc.send_signal(1)  # SIGHUP
    deadline = time.monotonic() + 10
    while b.proc.output().count("reload refused") < 2:
        assert time.monotonic() < deadline, b.proc.output()
        time.sleep(0.05)
    assert httpx.get(b.url + "/token", headers=HEADERS).text == token
    # SIGHUP with a fixed config: an added credential starts, the old token stays.
    extra = f"""
[credentials.second]
provider = "oauth2"
client_id = "broker-client"
token_url = "{issuer.url}/oauth2/token"
secret = "{b.proc.config.read_text().split('secret = "')[1].split('"')[0]}"
"""
    b.proc.config.write_text(good + extra)
    b.proc.proc.send_signal(1)  # SIGHUP
    deadline = time.monotonic() + 10
    while httpx.get(b.url + "/token/second", headers=HEADERS).status_code != 200:
        assert time.monotonic() < deadline, b.proc.output()
        time.sleep(0.05)
    assert httpx.get(b.url + "/token/main", headers=HEADERS).text == token


# -- the ways a keyring fails on a headless host, each produced for real ---------------


def cli_in_env(tmp_path: Path, env: dict[str, str], *argv: str) -> subprocess.CompletedProcess:
    cfg = write_config(tmp_path / "config.toml", "")
    return subprocess.run(
        [sys.executable, "-m", "broker", *argv, "--config", str(cfg)],
        input="s", capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip


ADD = ("add", "kf", "--client-id", "c", "--no-verify", "--secret-stdin")


def test_fail_backend_names_cause_and_way_out(tmp_path):
    env = {**os.environ, "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"}
    r = cli_in_env(tmp_path, env, *ADD)
    assert r.returncode == 1
    assert "no keyring backend is available" in r.stderr
    assert "PYTHON_KEYRING_BACKEND selects the fail backend" in r.stderr
    assert "or pass --secret file:PATH" in r.stderr


def test_no_dbus_session(tmp_path):
    runtime = tmp_path / "run"
    runtime.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DBUS_SESSION_BUS_ADDRESS", "PYTHON_KEYRING_BACKEND")
    }
    env.update(XDG_RUNTIME_DIR=str(runtime), HOME=str(tmp_path))
    r = cli_in_env(tmp_path, env, *ADD)
    assert r.returncode == 1
    assert "no D-Bus session bus" in r.stderr and "start a Secret Service" in r.stderr


def test_no_secret_service_on_the_bus(tmp_path):
    empty = tmp_path / "services"
    empty.mkdir()
    conf = tmp_path / "bus.conf"
    conf.write_text(f"""<busconfig>
  <type>session</type>
  <listen>unix:path={tmp_path}/bus</listen>
  <auth>EXTERNAL</auth>
  <servicedir>{empty}</servicedir>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
""")
    out = subprocess.run(
        ["dbus-daemon", f"--config-file={conf}", "--fork", "--print-pid=1"],
        capture_output=True, text=True, check=True, timeout=20,
    ).stdout  # fmt: skip
    try:
        env = {k: v for k, v in os.environ.items() if k != "PYTHON_KEYRING_BACKEND"}
        env.update(DBUS_SESSION_BUS_ADDRESS=f"unix:path={tmp_path}/bus", HOME=str(tmp_path))
        r = cli_in_env(tmp_path, env, *ADD)
        assert r.returncode == 1
        assert "no Secret Service provider (org.freedesktop.secrets)" in r.stderr
    finally:
        os.kill(int(out.split()[0]), 15)


def daemon_failure(issuer, session, tmp_path: Path, name: str) -> str:
    """Serve one keyring credential ``name``; return its last_error once it has failed."""
    port = reserve_port()
    cfg = broker_config(
        tmp_path,
        port,
        f"""
[credentials.{name}]
provider = "oauth2"
client_id = "c"
token_url = "{issuer.url}/oauth2/token"
""",
    )
    proc = BrokerProcess(cfg, env=session.env)
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_healthy(url)
        deadline = time.monotonic() + 30
        while True:
            st = httpx.get(f"{url}/v1/credentials/{name}", headers=HEADERS).json()
            if st["state"] == "failed":
                break
            assert time.monotonic() < deadline, proc.output()
            # The keyring is read in a child process: /healthz never waits on D-Bus.
            assert httpx.get(url + "/healthz", timeout=1).status_code == 200
            time.sleep(0.1)
        assert httpx.get(f"{url}/token/{name}", headers=HEADERS).status_code == 503
        return st["last_error"]["description"]
    finally:
        proc.stop()


def test_missing_item_in_the_daemon(issuer, keyring_env, tmp_path):
    error = daemon_failure(issuer, keyring_env, tmp_path, "missing1")
    assert "no keyring item service='token-broker' username='missing1'" in error
    assert "token-broker add missing1" in error


def test_locked_collection_in_the_daemon(issuer, own_secret_service, tmp_path):
    env = {**os.environ, **own_secret_service.env}
    subprocess.run(
        ["secret-tool", "store", "--label=t", "service", "token-broker", "username", "locked1"],
        input="v", text=True, env=env, check=True,
    )  # fmt: skip
    lock = """
import secretstorage
conn = secretstorage.dbus_init()
secretstorage.get_default_collection(conn).lock()
"""
    subprocess.run([sys.executable, "-c", lock], env=env, check=True, timeout=30)
    error = daemon_failure(issuer, own_secret_service, tmp_path, "locked1")
    assert "the collection is locked" in error and "start a Secret Service" in error


def test_doctor_checklist(issuer, keyring_env, tmp_path, monkeypatch, capsys):
    secret = new_secret()
    issuer.issuer.add_client("doc", secret)
    port = reserve_port()
    secret_file = tmp_path / "partner.secret"
    secret_file.write_text(secret)
    secret_file.chmod(0o644)  # too open: doctor must say so
    cfg = broker_config(
        tmp_path,
        port,
        f"""
[credentials.viafile]
provider = "oauth2"
client_id = "doc"
token_url = "{issuer.url}/oauth2/token"
secret = "file:{secret_file}"
""",
    )
    assert main(["doctor", "--config", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL  secret file of 'viafile' {secret_file} has mode 0644: group or others" in out
    assert f"run `chmod 600 {secret_file}`" in out
    assert "  ok  keyring backend keyring.backends.SecretService.Keyring works" in out
    assert "  ok  listen 127.0.0.1:" in out and "is loopback-only" in out
    assert "  ok  issuer of 'viafile' reachable and the credential accepted" in out
    assert secret not in out

    secret_file.chmod(0o600)
    calls = issuer.issuer.calls
    assert main(["doctor", "--offline", "--json", "--config", str(cfg)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and issuer.issuer.calls == calls
    assert {c["verdict"] for c in report["checks"]} == {"ok"}

    issuer.issuer.clients["doc"].clear()  # the issuer now refuses the secret
    assert main(["doctor", "--config", str(cfg)]) == 1
    assert "FAIL  issuer of 'viafile' refused or failed" in capsys.readouterr().out

    assert main(["doctor", "--config", str(tmp_path / "nope.toml")]) == 1
    assert "FAIL  config:" in capsys.readouterr().out


def test_a_second_added_credential_keeps_the_first_as_default(
    keyring_env, tmp_path, monkeypatch, capsys
):
    """GET /token served the only credential; after `add` of a second one it still does."""
    cfg = tmp_path / "config.toml"
    base = ["--no-verify", "--secret-stdin", "--config", str(cfg)]
    assert run_cli(monkeypatch, ["add", "first2", "--client-id", "a", *base], "s1") == 0
    capsys.readouterr()
    assert run_cli(monkeypatch, ["add", "second2", "--client-id", "b", *base], "s2") == 0
    out = capsys.readouterr().out
    assert '[server] default = "first2" written' in out
    assert 'default = "first2"' in cfg.read_text()
    for name in ("first2", "second2"):
        assert run_cli(monkeypatch, ["remove", name, "--config", str(cfg)]) == 0
