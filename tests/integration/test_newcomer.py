"""From the demo to a first real credential, as a new user goes: the traps on the way.

Each test is one trap found by following the README on a clean machine: the
config file a normal user's `add` writes, a second credential that must not
take `GET /token` from the first, a headless host that writes its secret to a
file, a daemon that refuses to reload for want of a client key, `doctor` with
nothing configured, and the `list` and `import` details. The CLI runs as a
process where the user it runs as matters (a user namespace makes it uid 1000
without a Secret Service), in-process elsewhere.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest
from doctext import as_uid_1000
from helpers import (
    HEADERS,
    BrokerProcess,
    config_file,
    new_secret,
    reserve_port,
    wait_for,
    write_config,
)

from broker.access import key_digest, new_key
from broker.cli import main
from broker.config import SYSTEM_CONFIG

PROJECT = {
    "project": {
        "id": "4566206088344",
        "name": "usersync",
        "title": "User Sync",
        "org": {"id": "98765", "name": "Org", "ims_org_id": "ABCDEF0123456789ABCDEF01@AdobeOrg"},
        "workspace": {
            "id": "4566206088345",
            "name": "Production",
            "details": {
                "credentials": [
                    {
                        "id": "222",
                        "name": "Credential in Production",
                        "integration_type": "oauth_server_to_server",
                        "oauth_server_to_server": {
                            "client_id": "first-client",
                            "client_secrets": ["FIRST-SECRET"],
                            "technical_account_id": "TA@techacct.adobe.com",
                            "technical_account_email": "x@techacct.adobe.com",
                            "scopes": ["openid", "AdobeID", "user_management_sdk"],
                        },
                    }
                ]
            },
        },
    }
}


def project(name: str, client_id: str, *secrets: str, credentials: int = 1) -> dict:
    """A Developer Console project download with ``credentials`` S2S credentials."""
    data = json.loads(json.dumps(PROJECT))
    data["project"]["name"] = name
    creds = data["project"]["workspace"]["details"]["credentials"]
    s2s = creds[0]["oauth_server_to_server"]
    s2s["client_id"], s2s["client_secrets"] = client_id, list(secrets)
    for i in range(1, credentials):
        extra = json.loads(json.dumps(creds[0]))
        extra["id"] = str(300 + i)
        extra["oauth_server_to_server"]["client_id"] = f"{client_id}-{i + 1}"
        creds.append(extra)
    return data


def run_cli(monkeypatch, argv: list[str], stdin: str = "") -> int:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return main(argv)


# -- trap 1: the config file a normal user's `add` writes ----------------------------------


def as_user(home: Path, *argv: str, stdin: str = "", env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    """``python -m broker ARGV`` as uid 1000 (a user namespace), on a host without a
    Secret Service: no D-Bus session, nothing configured, HOME and XDG in ``home``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TOKEN_BROKER_", "DBUS_"))}
    clean.pop("PYTHON_KEYRING_BACKEND", None)
    runtime = home / "run"
    runtime.mkdir(exist_ok=True)
    clean.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"),
                 XDG_RUNTIME_DIR=str(runtime),
                 XDG_STATE_HOME=str(home / ".local/state"))  # fmt: skip
    clean.update(env or {})
    return subprocess.run(
        as_uid_1000([sys.executable, "-m", "broker", *argv]),
        input=stdin, capture_output=True, text=True, env=clean, timeout=120,
    )  # fmt: skip


@pytest.fixture
def no_system_config():
    """No /etc/token-broker/config.toml before; none left behind after (a wrong write
    would create it: it is removed again and the test fails)."""
    if SYSTEM_CONFIG.exists():
        pytest.skip(f"{SYSTEM_CONFIG} exists here: these tests need a host without")
    made_dir = not SYSTEM_CONFIG.parent.exists()
    yield
    leaked = SYSTEM_CONFIG.exists()
    if leaked:
        SYSTEM_CONFIG.unlink()
        if made_dir:
            shutil.rmtree(SYSTEM_CONFIG.parent, ignore_errors=True)
    assert not leaked, f"a normal user's command wrote {SYSTEM_CONFIG}"


def test_a_normal_users_first_add_creates_their_own_config(issuer, tmp_path, no_system_config):
    home = tmp_path / "home"
    home.mkdir()
    secret = new_secret()
    issuer.issuer.add_client("cid", secret)
    file_ref = f"file:{home}/.config/token-broker/adobe.secret"
    done = as_user(home, "add", "adobe", "--client-id", "cid", "--ims-url", issuer.url,
                   "--secret-stdin", "--secret", file_ref, stdin=secret)  # fmt: skip
    assert done.returncode == 0, done.stderr
    config = home / ".config" / "token-broker" / "config.toml"
    assert f"{config} created" in done.stdout  # it says which file it wrote
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert stat.S_IMODE(config.parent.stat().st_mode) == 0o700
    assert 'secret = "file:' in config.read_text() and secret not in config.read_text()
    # Reading commands find it: the search order starts with the user's file.
    listed = as_user(home, "doctor", "--offline")
    assert f"config {config} found and valid" in listed.stdout, listed.stdout + listed.stderr


def test_without_a_keyring_add_says_how_to_use_a_file(tmp_path, no_system_config):
    home = tmp_path / "home"
    home.mkdir()
    done = as_user(home, "add", "adobe", "--client-id", "cid", "--no-verify", "--secret-stdin",
                   stdin="s")  # fmt: skip
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "--secret file:PATH" in done.stderr, done.stderr
    assert not (home / ".config" / "token-broker" / "config.toml").exists()  # nothing half-done


def test_an_unwritable_config_is_one_sentence_not_a_traceback(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)  # owned by root: uid 1000 in the namespace may not write it
    home = tmp_path / "home"
    home.mkdir()
    target = locked / "config.toml"
    done = as_user(home, "add", "a", "--client-id", "c", "--no-verify", "--secret-stdin",
                   "--secret", f"file:{home}/a.secret", "--config", str(target),
                   stdin="s")  # fmt: skip
    if done.returncode == 0:
        pytest.skip("this user namespace may write root's files (no real permission check)")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"{target}: cannot write the config file (Permission denied)" in done.stderr


def test_root_writes_the_system_config_readable_by_the_service(tmp_path, monkeypatch, capsys):
    """Root's first `add` creates /etc/token-broker/config.toml (here: a stand-in path),
    0644 in a 0755 directory: the system service's own user reads it; it holds no secret."""
    from broker import config

    system = tmp_path / "etc" / "token-broker" / "config.toml"
    monkeypatch.setattr(config, "SYSTEM_CONFIG", system)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("TOKEN_BROKER_CONFIG", raising=False)
    argv = ["add", "adobe", "--client-id", "c", "--no-verify", "--secret", "systemd:adobe",
            "--secret-stdin"]  # fmt: skip
    assert run_cli(monkeypatch, argv, "s") == 0
    assert f"{system} created" in capsys.readouterr().out
    assert stat.S_IMODE(system.stat().st_mode) == 0o644
    assert stat.S_IMODE(system.parent.stat().st_mode) == 0o755


# -- trap 2: a second credential keeps GET /token where it was ------------------------------


def test_a_second_credential_keeps_the_first_as_default(issuer, tmp_path, monkeypatch, capsys):
    port = reserve_port()
    cfg = config_file(tmp_path / "config.toml", server={"listen": [f"127.0.0.1:{port}"]})
    issuer.issuer.add_client("first-client", "FIRST-SECRET")
    issuer.issuer.add_client("second-client", "SECOND-SECRET")
    first = tmp_path / "first.json"
    first.write_text(json.dumps(project("first", "first-client", "FIRST-SECRET")))
    secrets_dir = tmp_path / "secrets"
    common = ["--ims-url", issuer.url, "--keep", "--config", str(cfg),
              "--secret", f"file:{secrets_dir}/"]  # fmt: skip
    assert run_cli(monkeypatch, ["import", str(first), *common]) == 0
    assert "default" not in cfg.read_text()  # one credential: it is the default anyway
    proc = BrokerProcess(cfg)
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_healthy(url)
        wait_for(lambda: httpx.get(url + "/readyz").status_code == 200, what="first token")
        before = httpx.get(url + "/token", headers=HEADERS)
        assert before.status_code == 200
        capsys.readouterr()
        second = tmp_path / "second.json"
        second.write_text(json.dumps(project("second", "second-client", "SECOND-SECRET")))
        assert run_cli(monkeypatch, ["import", str(second), *common]) == 0
        out = capsys.readouterr().out
        assert '[server] default = "first" written' in out and "--default" in out, out
        assert 'default = "first"' in cfg.read_text()
        wait_for(lambda: httpx.get(url + "/token/second", headers=HEADERS).status_code == 200,
                 what="the second credential served")  # fmt: skip
        after = httpx.get(url + "/token", headers=HEADERS)
        assert after.status_code == 200 and after.text == before.text  # still the first's
        # --default hands GET /token to the new credential, and says so.
        third = tmp_path / "third.json"
        third.write_text(json.dumps(project("third", "second-client", "SECOND-SECRET")))
        assert run_cli(monkeypatch, ["import", str(third), "--default", *common]) == 0
        assert "third is now the [server] default" in capsys.readouterr().out
        assert 'default = "third"' in cfg.read_text()
    finally:
        proc.stop()


def test_add_writes_the_default_too(tmp_path, monkeypatch, capsys):
    cfg = write_config(tmp_path / "c.toml", '[credentials.one]\nprovider = "adobe"\n'
                       'client_id = "1"\nsecret = "env:ONE"\n')  # fmt: skip
    argv = ["add", "two", "--client-id", "2", "--no-verify", "--secret-stdin",
            "--secret", f"file:{tmp_path}/two.secret", "--config", str(cfg)]  # fmt: skip
    assert run_cli(monkeypatch, argv, "s2") == 0
    assert '[server] default = "one" written' in capsys.readouterr().out
    assert 'default = "one"' in cfg.read_text()


# -- trap 3: a headless host writes its secret to a file (or to systemd) --------------------


def test_import_writes_a_0600_secret_file_and_the_second_secret_beside_it(
    issuer, tmp_path, monkeypatch, capsys
):
    issuer.issuer.add_client("c1", "ONE")
    issuer.issuer.add_client("c1", "TWO")
    exported = tmp_path / "project.json"
    exported.write_text(json.dumps(project("proj", "c1", "ONE", "TWO")))
    cfg = tmp_path / "conf" / "config.toml"
    secret = tmp_path / "private" / "adobe.secret"
    argv = ["import", str(exported), "--ims-url", issuer.url, "--delete", "--config", str(cfg),
            "--secret", f"file:{secret}"]  # fmt: skip
    assert run_cli(monkeypatch, argv) == 0
    out = capsys.readouterr().out
    assert f"the file {secret} (mode 0600)" in out
    assert secret.read_text() == "ONE\n" and Path(f"{secret}.next").read_text() == "TWO\n"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(secret.parent.stat().st_mode) == 0o700
    assert f'secret = "file:{secret}"' in cfg.read_text()
    assert not exported.exists()


def test_a_secret_file_holding_something_else_is_kept_without_force(tmp_path, monkeypatch, capsys):
    secret = tmp_path / "adobe.secret"
    secret.write_text("OTHER\n")
    cfg = tmp_path / "config.toml"
    argv = ["add", "adobe", "--client-id", "c", "--no-verify", "--secret-stdin",
            "--secret", f"file:{secret}", "--config", str(cfg)]  # fmt: skip
    assert run_cli(monkeypatch, argv, "NEW") == 1
    assert "exists and holds something else; pass --force" in capsys.readouterr().err
    assert secret.read_text() == "OTHER\n" and not cfg.exists()  # nothing changed
    assert run_cli(monkeypatch, [*argv, "--force"], "NEW") == 0
    assert secret.read_text() == "NEW\n"
    # The same secret again is fine (a re-run after a failure), no --force needed.
    cfg.unlink()
    assert run_cli(monkeypatch, argv, "NEW") == 0


def test_systemd_prints_the_line_to_run_and_env_is_refused(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "config.toml"
    argv = ["add", "adobe", "--client-id", "c", "--no-verify", "--secret-stdin",
            "--config", str(cfg)]  # fmt: skip
    assert run_cli(monkeypatch, [*argv, "--secret", "systemd:adobe"], "SECRET") == 0
    out = capsys.readouterr().out
    assert "systemd-creds encrypt --name=adobe - /etc/credstore.encrypted/token-broker.adobe" in out
    assert "LoadCredentialEncrypted=adobe:/etc/credstore.encrypted/token-broker.adobe" in out
    assert "SECRET" not in out and 'secret = "systemd:adobe"' in cfg.read_text()
    assert run_cli(monkeypatch, [*argv[:1], "other", *argv[2:], "--secret", "env:X"], "S") == 1
    err = capsys.readouterr().err
    assert "--secret env:X cannot be written" in err and "file:PATH" in err


def test_import_with_systemd_keeps_the_project_file(tmp_path, monkeypatch, capsys):
    exported = tmp_path / "project.json"
    exported.write_text(json.dumps(project("proj", "c1", "ONE")))
    cfg = tmp_path / "config.toml"
    argv = ["import", str(exported), "--no-verify", "--delete", "--secret", "systemd",
            "--config", str(cfg)]  # fmt: skip
    assert run_cli(monkeypatch, argv) == 0
    out, err = capsys.readouterr()
    assert "systemd-creds encrypt --name=proj -" in out
    assert exported.exists() and "kept for the systemd-creds line" in err


# -- trap 4: a refused reload is an error, and says the way out ------------------------------


@pytest.fixture
def short_dir():
    path = Path(tempfile.mkdtemp(prefix="tb-nc-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_the_same_host_reloads_its_daemon_over_the_unix_socket(start_broker, short_dir, capsys):
    sock = short_dir / "b.sock"
    broker = start_broker(listen=(f"unix:{sock}",))
    cfg = str(broker.proc.config)
    assert main(["client", "add", "ci", "--credentials", "main", "--config", cfg]) == 0
    first = capsys.readouterr().err
    assert "the running daemon reloaded" in first
    assert httpx.get(broker.url + "/token", headers=HEADERS).status_code == 401
    # The daemon has keys now, and this user holds none: over the unix socket, the
    # daemon's own user (root here) still reloads it, for this "*" key to take effect.
    assert main(["client", "add", "admin", "--credentials", "*", "--config", cfg]) == 0
    out, err = capsys.readouterr()
    assert "the running daemon reloaded" in err, err
    admin = {**HEADERS, "Authorization": f"Bearer {out.strip()}"}
    assert httpx.get(broker.url + "/token", headers=admin).status_code == 200  # no signal
    assert main(["reload", "--config", cfg]) == 0  # `reload` asks over the socket too
    # Over TCP nobody is known: a key is needed, as before.
    refused = httpx.post(broker.url + "/v1/reload", headers=HEADERS)
    assert refused.status_code == 401
    assert "this is the first client key" in first  # every other reader needs one now
    assert "this is the first client key" not in err


def test_a_refused_reload_exits_1_and_names_the_ways_out(start_broker, capsys, monkeypatch):
    broker = start_broker()
    cfg = str(broker.proc.config)
    assert main(["client", "add", "ci", "--credentials", "main", "--config", cfg]) == 0
    key = capsys.readouterr().out.strip()
    # `list` without a key: what the CLI wants, not only what HTTP said.
    assert main(["list", "--config", cfg]) == 1
    err = capsys.readouterr().err
    assert "--key-file" in err and "$TOKEN_BROKER_CLIENT_KEY_FILE" in err
    # A second client over TCP only: the daemon cannot know this user; exit 1, and how.
    assert main(["client", "add", "admin", "--credentials", "*", "--config", cfg]) == 1
    err = capsys.readouterr().err
    assert "refused to reload" in err and "--key-file" in err
    assert "$TOKEN_BROKER_CLIENT_KEY_FILE" in err
    assert f"kill -HUP {broker.proc.proc.pid}" in err and "systemctl reload" in err
    assert "unix socket" in err
    assert main(["reload", "--config", cfg]) == 1
    assert f"kill -HUP {broker.proc.proc.pid}" in capsys.readouterr().err
    # A key that may not read everything is refused too (403), with the same advice.
    monkeypatch.setenv("TOKEN_BROKER_CLIENT_KEY", key)
    assert main(["reload", "--config", cfg]) == 1
    assert 'credentials are "*"' in capsys.readouterr().err


def test_over_the_socket_another_user_still_needs_a_key(start_broker, short_dir, issuer):
    import pwd

    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody here")
    if os.geteuid() != 0 or not shutil.which("curl"):
        pytest.skip("needs root (to speak as nobody) and curl")
    sock = short_dir / "b.sock"
    extra = f'[clients.ci]\nkey_sha256 = "{key_digest(new_key()).hex()}"\ncredentials = ["*"]\n'
    start_broker(listen=(f"unix:{sock}",), extra=extra, server='socket_mode = "0666"')
    done = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "--unix-socket",
         str(sock), "-H", "X-Token-Broker: 1", "http://localhost/v1/reload"],
        capture_output=True, text=True, timeout=30, user=nobody.pw_uid, group=nobody.pw_gid,
        extra_groups=[], env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.stdout == "401"


# -- trap 5: doctor with nothing configured ------------------------------------------------


def test_doctor_without_any_config_names_where_it_looked(tmp_path, monkeypatch, capsys):
    if SYSTEM_CONFIG.exists():
        pytest.skip(f"{SYSTEM_CONFIG} exists here")
    monkeypatch.delenv("TOKEN_BROKER_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "named by --config" not in out
    assert f"looked in {tmp_path}/xdg/token-broker/config.toml and {SYSTEM_CONFIG}" in out
    assert "'doctor'" not in out


def test_doctor_names_no_credential_called_doctor(tmp_path, monkeypatch, capsys):
    cfg = write_config(tmp_path / "c.toml", '[credentials.a]\nprovider = "adobe"\n'
                       'client_id = "1"\nsecret = "env:A_SECRET"\n')  # fmt: skip
    monkeypatch.setenv("A_SECRET", "x")
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyring.backends.fail.Keyring")
    import keyring.core

    monkeypatch.setattr(keyring.core, "_keyring_backend", None)
    main(["doctor", "--offline", "--config", str(cfg)])
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "keyring:" in x)
    assert line.startswith("warn") and "'doctor'" not in line, out
    assert "no credential uses the keyring" in line


# -- trap 8: the smaller ones --------------------------------------------------------------


def test_list_shows_a_last_error_only_while_it_matters(start_broker, issuer, capsys):
    issuer.issuer.mode = "error500"
    broker = start_broker(wait=False, refresh='retry_initial = "0.2s"\nretry_max = "0.4s"')
    broker.proc.wait_healthy(broker.url)

    def status() -> dict:  # type: ignore[type-arg]
        return httpx.get(broker.url + "/v1/credentials/main", headers=HEADERS).json()  # type: ignore[no-any-return]

    def state() -> str:
        return str(status()["state"])

    # The attempt's own moment ("refreshing") is too short to catch; its error stays.
    wait_for(lambda: status()["last_error"] is not None, what="a failed attempt")
    assert main(["list", "--url", broker.url]) == 0
    assert "internal_error" in capsys.readouterr().out  # while it fails, it is shown
    issuer.issuer.mode = "ok"
    wait_for(lambda: state() == "fresh", timeout=20, what="recovery")
    assert status()["last_error"] is not None  # the status JSON keeps the history
    assert main(["list", "--url", broker.url]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[2] == "fresh" and row[-1] == "-", row


@pytest.mark.xdist_group("port-8765")  # import asks the daemon on the default address
def test_imported_credentials_are_named_after_the_project(tmp_path, monkeypatch, capsys):
    exported = tmp_path / "project.json"
    exported.write_text(json.dumps(project("My Project", "c1", "ONE", credentials=2)))
    cfg = tmp_path / "config.toml"
    argv = ["import", str(exported), "--no-verify", "--keep", "--config", str(cfg),
            "--secret", f"file:{tmp_path}/secrets/"]  # fmt: skip
    assert run_cli(monkeypatch, argv) == 0
    out = capsys.readouterr().out
    assert "imported my-project (from 'Credential in Production'" in out
    assert "imported my-project-2 (from 'Credential in Production'" in out
    assert (tmp_path / "secrets" / "my-project-2").read_text() == "ONE\n"
    # Both in one config: the second did not take GET /token from the first.
    assert 'default = "my-project"' in cfg.read_text()
