"""The walkthroughs of the README and docs/, run as written by the user they are for.

Each test takes its block from the documentation itself (``block("NAME")``, see
tests/doctext.py) and runs it in a fresh home: the README's first credential
with a Secret Service, and on a host without one as a normal user (uid 1000 in
a user namespace); the credentials page's import, add, rotation and cycling;
the client keys of the access page; a umapi-client script. What a test must
change to run a block here is said where it is done: the issuer's URL where a
command would ask Adobe IMS, and the stand-in's where a script would call
Adobe's API.
"""

from __future__ import annotations

import os
import pty
import select
import socket
import stat
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from doctext import (
    CLIENT_ID,
    ORG,
    as_uid_1000,
    block,
    commands,
    project_json,
    sandbox,
    system_config_untouched,
    user_env,
    users_config,
)
from helpers import HEADERS, config_file, new_secret, wait_for

from broker.config import SYSTEM_CONFIG


def _ims(line: str, issuer_url: str) -> str:
    """A command that would ask Adobe IMS asks the test's issuer (--ims-url)."""
    command = line.split(" | ")[-1]
    if command.startswith(("token-broker import ", "token-broker add ")) and "oauth2" not in line:
        return line.split(" #", 1)[0] + f" --ims-url {issuer_url}"
    return line


def _walk(body: str, env: dict[str, str], home: Path, issuer_url: str, *, userns: bool = False):  # type: ignore[no-untyped-def]
    """Run a block's commands in order, ``token-broker serve`` in the background (it runs
    in the foreground in a terminal of its own); return what the last command printed."""
    serve: subprocess.Popen[bytes] | None = None
    log = None
    out = ""
    try:
        for line in commands(body):
            argv = ["bash", "-e", "-c", _ims(line, issuer_url)]
            argv = as_uid_1000(argv) if userns else argv
            if line == "token-broker serve":
                with socket.socket() as probe:
                    assert probe.connect_ex(("127.0.0.1", 8765)) != 0, "port 8765 is taken"
                log = open(home / "serve.log", "wb")  # noqa: SIM115 - the process keeps it
                running = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
                serve = running
                wait_for(lambda p=running: _ready(p, home), timeout=30, what="token-broker serve")
                continue
            done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=home,
                                  timeout=120)  # fmt: skip
            assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
            out = done.stdout + done.stderr
    finally:
        if serve is not None:
            serve.terminate()
            serve.wait(timeout=15)
        if log is not None:
            log.close()
    return out


def _ready(serve: subprocess.Popen[bytes], home: Path) -> bool:
    assert serve.poll() is None, (home / "serve.log").read_text()
    try:
        return httpx.get("http://127.0.0.1:8765/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture(autouse=True)
def _no_system_config():  # type: ignore[no-untyped-def]
    with system_config_untouched():
        yield


def _keyring(session) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Only the session bus of the test's Secret Service: HOME and XDG stay the user's."""
    return {"DBUS_SESSION_BUS_ADDRESS": session.env["DBUS_SESSION_BUS_ADDRESS"]}


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    path.chmod(0o755)
    return path


# -- the README's first credential ---------------------------------------------------------


@pytest.mark.xdist_group("port-8765")  # `token-broker serve` with the default address
def test_first_credential_with_a_keyring(issuer, own_secret_service, home):
    """As root here (the test's Secret Service is root's): root's `import` would write
    /etc/token-broker/config.toml, so the user's own (empty) file exists first; the
    file's creation is the test below, as uid 1000."""
    users_config(home)
    secret = new_secret()
    issuer.issuer.add_client(CLIENT_ID, secret)
    project_json(home / "Downloads" / "project.json", secret)
    env = {**user_env(home), **_keyring(own_secret_service)}
    out = _walk(block("first-credential"), env, home, issuer.url)
    assert out in issuer.issuer.issued  # curl printed a token the issuer handed out
    config = home / ".config" / "token-broker" / "config.toml"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert "[credentials.adobe]" in config.read_text()
    assert own_secret_service.lookup("token-broker", "adobe") == secret
    assert secret not in config.read_text() + (home / "serve.log").read_text()


@pytest.mark.xdist_group("port-8765")
def test_first_credential_as_a_normal_user_without_a_secret_service(issuer, home):
    """The done-when of the issue: uid 1000, no D-Bus session, nothing configured, from
    the project JSON to a served token with the README alone."""
    if SYSTEM_CONFIG.exists():
        pytest.skip(f"{SYSTEM_CONFIG} exists here: this test needs a host without")
    secret = new_secret()
    issuer.issuer.add_client(CLIENT_ID, secret)
    project_json(home / "Downloads" / "project.json", secret)
    env = user_env(home)
    assert "DBUS_SESSION_BUS_ADDRESS" not in env
    out = _walk(block("first-credential-headless"), env, home, issuer.url, userns=True)
    assert out in issuer.issuer.issued
    secret_file = home / ".config" / "token-broker" / "adobe.secret"
    assert secret_file.read_text() == secret + "\n"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(secret_file.parent.stat().st_mode) == 0o700
    assert not SYSTEM_CONFIG.exists()


# -- docs/credentials.md -------------------------------------------------------------------


@pytest.mark.xdist_group("port-8765")  # import asks the daemon on the default address
def test_import_a_project_into_the_keyring_and_into_a_file(issuer, own_secret_service, home):
    users_config(home)  # as root: see test_first_credential_with_a_keyring
    secret = new_secret()
    issuer.issuer.add_client(CLIENT_ID, secret)
    project_json(home / "Downloads" / "project.json", secret)
    env = {**user_env(home), **_keyring(own_secret_service)}
    out = _walk(block("import-project"), env, home, issuer.url)
    assert "imported usersync" in out
    assert own_secret_service.lookup("token-broker", "usersync") == secret
    other = home / "other"
    other.mkdir()
    users_config(other)
    project_json(other / "Downloads" / "project.json", secret)
    out = _walk(block("import-headless"), user_env(other), other, issuer.url)
    assert (other / ".config" / "token-broker" / "adobe.secret").read_text() == secret + "\n"


def _in_a_terminal(script: str, env: dict[str, str], cwd: Path, answers: dict[str, str]) -> str:
    """Run ``script`` with a terminal (getpass reads /dev/tty), typing each answer when its
    prompt appears; return everything the terminal showed."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: a session with the pty as its terminal
        os.chdir(cwd)
        os.execve("/bin/bash", ["bash", "-e", "-c", script], env)
    shown = b""
    pending = dict(answers)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            try:
                data = os.read(fd, 4096)
            except OSError:  # the child has ended
                break
            if not data:
                break
            shown += data
            for prompt in list(pending):
                if prompt.encode() in shown:
                    os.write(fd, pending.pop(prompt).encode() + b"\n")
    _, status = os.waitpid(pid, 0)
    text = shown.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    return text


@pytest.mark.xdist_group("port-8765")  # add asks the daemon on the default address
def test_add_by_hand_prompts_for_the_secret(issuer, own_secret_service, home):
    users_config(home)  # as root: see test_first_credential_with_a_keyring
    adobe, partner = new_secret(), new_secret()
    issuer.issuer.add_client(CLIENT_ID, adobe)
    issuer.issuer.add_client("broker", partner)
    script = "\n".join(
        _ims(line, issuer.url).replace(
            "https://login.example.com/oauth2/token", f"{issuer.url}/oauth2/token"
        )  # the generic issuer is the test's too
        for line in commands(block("add-by-hand"))
    )
    env = {**user_env(home), **_keyring(own_secret_service), "SECRET": partner}
    shown = _in_a_terminal(script, env, home, {"Client secret for adobe:": adobe})
    assert adobe not in shown and partner not in shown  # no echo
    assert own_secret_service.lookup("token-broker", "adobe") == adobe
    partner_file = home / ".config" / "token-broker" / "partner.secret"
    assert partner_file.read_text() == partner + "\n"
    config = (home / ".config" / "token-broker" / "config.toml").read_text()
    assert 'default = "adobe"' in config  # the second credential kept the first as default


@pytest.mark.xdist_group("port-8765")  # add asks the daemon on the default address
def test_rotate_by_hand(issuer, own_secret_service, home):
    users_config(home)  # as root: see test_first_credential_with_a_keyring
    old, new = new_secret(), new_secret()
    issuer.issuer.add_client(CLIENT_ID, old)
    env = {**user_env(home), **_keyring(own_secret_service)}
    setup = f"printf %s '{old}' | token-broker add adobe --client-id {CLIENT_ID} --secret-stdin"
    _walk(setup, env, home, issuer.url)
    issuer.issuer.add_client(CLIENT_ID, new)
    (home / "new.secret").write_text(new + "\n")
    body = block("rotate")
    first, finish = commands(body)
    _walk(first, env, home, issuer.url)
    assert own_secret_service.lookup("token-broker", "adobe#next") == new
    _walk(finish, env, home, issuer.url)
    assert own_secret_service.lookup("token-broker", "adobe") == new
    assert own_secret_service.lookup("token-broker", "adobe#next") is None


def test_automated_cycling_steps(issuer, own_secret_service, home):
    """The host's steps: import a project that lists the I/O Management API, set
    rotate_every, reload, one cycle now, list. The daemon runs beside (it does, on such a
    host); its config names a free port, and console_url the test's issuer, which plays
    the I/O Management API as well as IMS."""
    from helpers import BrokerProcess, reserve_port

    secret = new_secret()
    issuer.issuer.add_client(CLIENT_ID, secret)
    issuer.issuer.add_console(CLIENT_ID, "98765", "4566206088345")
    project_json(home / "project.json", secret, cycling=True)
    env = {**user_env(home), **_keyring(own_secret_service)}
    port = reserve_port()
    config = users_config(home)
    config_file(config, server={"listen": [f"127.0.0.1:{port}"]})
    lines = commands(block("cycling"))
    assert lines[0].startswith("token-broker import project.json")
    out = _walk(lines[0], env, home, issuer.url)
    assert "secret cycling possible" in out
    proc = BrokerProcess(
        config, env={**_keyring(own_secret_service), "XDG_STATE_HOME": env["XDG_STATE_HOME"]}
    )
    try:
        proc.wait_healthy(f"http://127.0.0.1:{port}")
        # "in [credentials.adobe] of the config: rotate_every = "30d"" (a comment in the
        # block: the user edits the file).
        with config.open("a") as f:
            f.write(f'rotate_every = "30d"\nconsole_url = "{issuer.url}"\n')
        out = _walk("\n".join(lines[1:]), env, home, issuer.url)
        assert "SECRET_AGE" in out and "NEXT_CYCLE" in out
        assert len(issuer.issuer.secrets_of(CLIENT_ID)) == 1  # the old secret is gone
        assert own_secret_service.lookup("token-broker", "adobe") != secret  # a new one is in use
    finally:
        proc.stop()


# -- docs/access.md and docs/using-tokens.md -------------------------------------------------


def test_client_keys_as_the_access_page_shows_them():
    with sandbox() as box:
        done = box.sh(block("client-keys"))
        assert done.returncode == 0, done.stdout + done.stderr
        for name in ("ops.key", "ci.key"):
            key_file = box.home / ".config" / name
            assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        # The last command removed ci and reloaded with ops's key: ci's key is refused now.
        ci = (box.home / ".config" / "ci.key").read_text().strip()
        refused = httpx.get(
            box.url + "/token", headers={**HEADERS, "Authorization": f"Bearer {ci}"}
        )
        assert refused.status_code == 401


def test_a_umapi_client_script_reads_users_through_the_broker():
    """The umapi-client script, in an environment with umapi-client 3.0.1 (as the User Sync
    Tool has it); Connection's default endpoint, Adobe's API, is the stand-in's here."""
    from ust import ROOT, python

    exe = python()
    with sandbox() as box:
        script = block("umapi-script").replace(
            'auth=BrokerAuth("adobe"),',
            f'auth=BrokerAuth("adobe"), endpoint="{box.api.endpoint}",',
        )
        env = {**box.env, "PYTHONPATH": str(ROOT)}
        done = subprocess.run([str(exe), "-"], input=script, capture_output=True, text=True,
                              env=env, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["ada@example.com"]
        assert box.api.accepted()  # the stand-in saw the broker's token
    assert ORG in script
