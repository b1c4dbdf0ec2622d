"""Secret cycling (DESIGN §11) with the broker as a process and the demo issuer's
I/O Management API on a loopback port.

Under continuous load, through whole cycles, for a file secret and a keyring
secret (a real gnome-keyring): plain ``GET /token``, the IMS-compatible
endpoint (TLS, a client key) and a ``BrokerAuth`` client against a stand-in
API all keep working. Then kill -9 at the boundaries a real process can be
stopped at (the issuer holds a request there, or the step waits on IMS), a
restart, and the cycle finished or undone; ``token-broker rotate --auto``
with and without a daemon; the demo's ``--rotate-every``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from helpers import (
    HEADERS,
    BrokerProcess,
    IssuerThread,
    Repeated,
    config_file,
    new_secret,
    reserve_port,
    rotations,
    wait_for,
)
from standin import StandInApi

from broker.access import new_key
from broker.client import BrokerAuth, TokenBroker

CLIENT = "broker-client"
ORG = "ABC@AdobeOrg"
CONSOLE_ORG = "4711"
CRED_ID = "88301"


@dataclass
class Broker:
    """One broker config (a credential that cycles), started and restarted at will."""

    issuer: IssuerThread
    tmp: Path
    secret_ref: str
    env: dict[str, str]
    every: str = "3s"  # "": no rotate_every
    verify: str = "20s"
    ims: bool = True  # an IMS-compatible listener (its local CA lives in the state directory)
    port: int = field(default_factory=reserve_port)
    ims_port: int = field(default_factory=reserve_port)
    key: str = field(default_factory=new_key)
    proc: BrokerProcess | None = None
    logs: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**self.env, "XDG_STATE_HOME": str(self.tmp / "state")}
        digest = hashlib.sha256(self.key.encode()).hexdigest()
        server: dict[str, object] = {"listen": [f"127.0.0.1:{self.port}"]}
        if self.ims:
            server["ims_listen"] = [f"127.0.0.1:{self.ims_port}"]
        main = {
            "provider": "adobe",
            "client_id": CLIENT,
            "org_id": ORG,
            "scopes": ["openid", "AdobeID"],
            "secret": self.secret_ref,
            "ims_url": self.issuer.url,
            "console_url": self.issuer.url,
            "credential_id": CRED_ID,
            "console_org_id": CONSOLE_ORG,
            **({"rotate_every": self.every} if self.every else {}),
            "rotate_verify": self.verify,
        }
        self.config = config_file(
            self.tmp / "config.toml",
            {"main": main},
            server=server,
            refresh={"force_cooldown": "0s"},
            # An administrator's key: it may also ask for a cycle.
            clients={"app": {"key_sha256": digest, "credentials": ["*"]}},
        )

    def start(self) -> Broker:
        _running.append(self)
        self.proc = BrokerProcess(self.config, env=self.env)
        self.proc.wait_healthy(self.url)
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.proc.kill()  # SIGKILL: no cleanup of any kind
        self.proc.proc.wait()
        self.proc.stop()
        self.logs.append(self.proc.output())

    def stop(self) -> None:
        if self.proc is not None and self.proc.proc.returncode is None:
            self.proc.stop()
            self.logs.append(self.proc.output())

    def get(self, path: str) -> httpx.Response:
        auth = {**HEADERS, "Authorization": f"Bearer {self.key}"}
        return httpx.get(self.url + path, headers=auth, timeout=10)

    def rotations(self, outcome: str = "success") -> int:
        return rotations(self.url, outcome)

    def state(self) -> dict[str, object]:
        path = self.tmp / "state" / "token-broker" / "cycling" / "main.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def ca_bundle(self) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "broker", "tls", "ca"], capture_output=True, text=True,
            env={**os.environ, **self.env}, check=True, timeout=60,
        )  # fmt: skip
        return done.stdout.strip()


_running: list[Broker] = []


@pytest.fixture(autouse=True)
def _stop_brokers() -> Iterator[None]:
    """Whatever a test asserted, no broker it started outlives it."""
    yield
    while _running:
        _running.pop().stop()


def at_adobe(issuer: IssuerThread) -> dict[str, str]:
    return {s.uuid: s.value for s in issuer.issuer.secrets_of(CLIENT)}


def every_secret_sent(issuer: IssuerThread) -> set[str]:
    """Every client_secret the broker ever presented to the issuer."""
    return {r.form["client_secret"] for r in issuer.issuer.received if "client_secret" in r.form}


def assert_nothing_leaked(broker: Broker, issuer: IssuerThread) -> None:
    broker.stop()
    text = "\n".join(broker.logs)
    for value in every_secret_sent(issuer) | set(issuer.issuer.issued):
        assert value not in text, "a secret or token appeared in the broker's output"


@pytest.fixture
def cycling_issuer(issuer: IssuerThread) -> IssuerThread:
    issuer.issuer.add_console(CLIENT, CONSOLE_ORG, CRED_ID)
    return issuer


@pytest.fixture
def api(issuer: IssuerThread) -> Iterator[StandInApi]:
    stand_in = StandInApi(lambda: issuer.issuer.issued, CLIENT, ORG).start()
    yield stand_in
    stand_in.stop()


@contextlib.contextmanager
def under_load(broker: Broker, issuer: IssuerThread, api: StandInApi) -> Iterator[Repeated]:
    """Three kinds of consumers asking continuously, each counting what failed."""
    issued = issuer.issuer.issued
    key = broker.key
    form = {"grant_type": "client_credentials", "client_id": CLIENT, "client_secret": key,
            "scope": "openid,AdobeID"}  # fmt: skip
    ca = ssl.create_default_context(cafile=broker.ca_bundle())
    tb = TokenBroker(broker.url, key=key)
    with (
        httpx.Client(base_url=broker.url, timeout=10,
                     headers={**HEADERS, "Authorization": f"Bearer {key}"}) as plain,
        httpx.Client(base_url=f"https://127.0.0.1:{broker.ims_port}", verify=ca,
                     timeout=10) as ims,
        tb,
        httpx.Client(auth=BrokerAuth("main", broker=tb), timeout=10) as authed,
    ):  # fmt: skip

        def token() -> str | None:
            r = plain.get("/token")
            return None if r.status_code == 200 and r.text in issued else _quoted(r)

        def ims_token() -> str | None:
            r = ims.post("/ims/token/v3", data=form)
            ok = r.status_code == 200 and r.json()["access_token"] in issued
            return None if ok else _quoted(r)

        def broker_auth() -> str | None:
            r = authed.get(f"{api.endpoint}/users/{ORG}/0")
            return None if r.status_code == 200 else f"HTTP {r.status_code}"

        with Repeated(pause=0.01, token=token, ims=ims_token, broker_auth=broker_auth) as run:
            yield run


def _quoted(r: httpx.Response) -> str:
    return f"HTTP {r.status_code} {r.text[:100]}"


def run_under_load(broker: Broker, issuer: IssuerThread, api: StandInApi, cycles: int) -> None:
    first = set(at_adobe(issuer))
    with under_load(broker, issuer, api) as running:
        wait_for(lambda: broker.rotations() >= cycles, timeout=90, what=f"{cycles} cycles")
        time.sleep(0.5)  # and some load after the last one
    assert running.failures == [], running.failures[:5]
    assert all(n > 20 for n in running.counts.values()), running.counts
    assert set(at_adobe(issuer)).isdisjoint(first)  # the original secret is gone
    assert len(at_adobe(issuer)) in (1, 2)  # a next cycle may be between POST and DELETE


def test_cycles_under_load_with_a_file_secret(cycling_issuer, api, tmp_path):
    secret = new_secret()
    cycling_issuer.issuer.add_client(CLIENT, secret)
    secret_file = tmp_path / "adobe.secret"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    broker = Broker(cycling_issuer, tmp_path, f"file:{secret_file}", {}).start()
    try:
        run_under_load(broker, cycling_issuer, api, cycles=2)
        # Stop cycling, then compare what is stored with what Adobe has.
        broker.stop()
        assert list(at_adobe(cycling_issuer).values()) == [secret_file.read_text().strip()]
        assert secret_file.stat().st_mode & 0o777 == 0o600
        assert not secret_file.with_name("adobe.secret.next").exists()
    finally:
        assert_nothing_leaked(broker, cycling_issuer)


def test_cycles_under_load_with_a_keyring_secret(cycling_issuer, api, tmp_path, keyring_env):
    secret = new_secret()
    cycling_issuer.issuer.add_client(CLIENT, secret)
    service, user = "token-broker-cycling", f"main-{os.getpid()}-{time.monotonic_ns()}"
    subprocess.run(
        ["secret-tool", "store", "--label", "cycling test", "service", service, "username", user],
        input=secret, text=True, check=True, env={**os.environ, **keyring_env.env}, timeout=10,
    )  # fmt: skip
    broker = Broker(cycling_issuer, tmp_path, f"keyring:{service}/{user}", keyring_env.env)
    broker.start()
    try:
        run_under_load(broker, cycling_issuer, api, cycles=2)
        broker.stop()
        # What the keyring holds (secret-tool, not our code) is what Adobe has.
        assert list(at_adobe(cycling_issuer).values()) == [keyring_env.lookup(service, user)]
        assert keyring_env.lookup(service, user + "#next") is None
    finally:
        assert_nothing_leaked(broker, cycling_issuer)


def settled(broker: Broker, issuer: IssuerThread) -> bool:
    """A cycle finished or undone: no step recorded, one secret at Adobe."""
    return broker.state().get("step", "x") is None and len(at_adobe(issuer)) == 1


def file_broker(issuer: IssuerThread, tmp_path: Path, **kw: object) -> tuple[Broker, Path]:
    secret = new_secret()
    issuer.issuer.add_client(CLIENT, secret)
    secret_file = tmp_path / "adobe.secret"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    return Broker(issuer, tmp_path, f"file:{secret_file}", {}, **kw), secret_file  # type: ignore[arg-type]


def stored(secret_file: Path) -> list[str]:
    found = [secret_file.read_text().strip()]
    upcoming = secret_file.with_name(secret_file.name + ".next")
    if upcoming.exists():
        found.append(upcoming.read_text().strip())
    return found


@pytest.mark.parametrize("event", ["POST", "POST_APPLIED", "DELETE"])
def test_kill_9_while_the_issuer_holds_a_step_then_restart(cycling_issuer, tmp_path, event):
    """POST: killed before Adobe made a secret. POST_APPLIED: Adobe made one, the answer
    (its only copy of the value) never arrived. DELETE: killed while the old secret is
    being deleted, the new one in use."""
    issuer = cycling_issuer
    broker, secret_file = file_broker(issuer, tmp_path, every="1h")
    original = secret_file.read_text().strip()
    # No state yet: the broker surveys, then cycles at created_at + 1h; ask for one now.
    broker.start()
    issuer.issuer.hold = {event}
    rotate = subprocess.Popen(
        [sys.executable, "-m", "broker", "rotate", "main", "--auto", "--config",
         str(broker.config)],
        env={**os.environ, **broker.env, "TOKEN_BROKER_CLIENT_KEY": broker.key},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for(lambda: event in issuer.issuer.held, timeout=30, what=f"{event} held")
        broker.kill()
        values = set(at_adobe(issuer).values())
        assert len(values) <= 2 and any(v in values for v in stored(secret_file))
    finally:
        issuer.issuer.hold = set()
        issuer.issuer.release()
        said = rotate.communicate(timeout=60)[0].decode()
    # The daemon died under the command: it says so, and never shows a secret.
    assert rotate.returncode == 1 and "the cycle may still be running" in said, said
    try:
        broker.start()  # resumes the interrupted cycle at once
        wait_for(lambda: settled(broker, issuer), timeout=60, what="the cycle settled")
        ((_, value),) = at_adobe(issuer).items()
        assert stored(secret_file) == [value]
        r = broker.get("/token")
        assert r.status_code == 200 and r.text in issuer.issuer.issued
        if event == "DELETE":  # it was switched already: finished with the new secret
            assert value != original
    finally:
        assert_nothing_leaked(broker, issuer)


def test_kill_9_while_the_new_secret_is_being_verified_then_restart(cycling_issuer, tmp_path):
    """Killed at step 3 (the new secret stored, IMS does not take it yet); the restarted
    broker tries again and finishes."""
    issuer = cycling_issuer
    issuer.issuer.activation_delay = 3600.0
    broker, secret_file = file_broker(issuer, tmp_path, every="2s")
    broker.start()
    try:
        wait_for(lambda: broker.state().get("step") == "added", timeout=30, what="step added")
        assert len(stored(secret_file)) == 2
        broker.kill()
        issuer.issuer.activation_delay = 0.0
        for s in issuer.issuer.secrets_of(CLIENT):
            s.works_from = 0.0
        broker.start()
        wait_for(lambda: broker.rotations() >= 1, timeout=60, what="the resumed cycle")
        broker.stop()
        assert list(at_adobe(issuer).values()) == stored(secret_file)
    finally:
        assert_nothing_leaked(broker, issuer)


def test_kill_9_while_discarding_then_restart(cycling_issuer, tmp_path):
    """The new secret never works: killed while its DELETE is held; the restart finishes
    the discard with the old secret's token and keeps the old secret."""
    issuer = cycling_issuer
    issuer.issuer.new_secrets_work = False
    broker, secret_file = file_broker(issuer, tmp_path, every="2s", verify="2s")
    original = secret_file.read_text().strip()
    issuer.issuer.hold = {"DELETE"}
    broker.start()
    try:
        wait_for(lambda: "DELETE" in issuer.issuer.held, timeout=60, what="DELETE held")
        assert broker.state()["step"] == "discarding"
        broker.kill()
        issuer.issuer.hold = set()
        issuer.issuer.release()
        broker.start()
        wait_for(lambda: broker.rotations("discarded") >= 1, timeout=60, what="discarded")
        broker.stop()
        assert list(at_adobe(issuer).values()) == [original] == stored(secret_file)
        deletes = [c for c in issuer.issuer.console_calls if c.method == "DELETE"]
        old_uuid = issuer.issuer.secrets_of(CLIENT)[0].uuid
        assert {c.minted_by for c in deletes} == {old_uuid}  # the old secret's token
    finally:
        assert_nothing_leaked(broker, issuer)


def test_a_conflict_is_reported_in_list_and_changes_nothing(cycling_issuer, tmp_path):
    issuer = cycling_issuer
    broker, secret_file = file_broker(issuer, tmp_path, every="2s")
    other = issuer.issuer.add_client(CLIENT, "somebody-elses-secret-value")
    broker.start()
    try:
        wait_for(lambda: broker.rotations("conflict") >= 1, timeout=30, what="a conflict")
        status = broker.get("/v1/credentials/main").json()["secret_cycling"]
        assert status["last_error"]["outcome"] == "conflict"
        assert other.uuid in status["last_error"]["detail"]
        listed = subprocess.run(
            [sys.executable, "-m", "broker", "list", "--url", broker.url],
            env={**os.environ, "TOKEN_BROKER_CLIENT_KEY": broker.key},
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout  # fmt: skip
        assert "SECRET_AGE" in listed and "NEXT_CYCLE" in listed and "cycle conflict" in listed
        assert len(at_adobe(issuer)) == 2 and len(stored(secret_file)) == 1
        assert [c.method for c in issuer.issuer.console_calls if c.method != "GET"] == []
        assert f"{other.uuid}" in broker.proc.output()  # type: ignore[union-attr]
    finally:
        assert_nothing_leaked(broker, issuer)


def test_rotate_auto_asks_the_daemon_or_runs_here(cycling_issuer, tmp_path):
    issuer = cycling_issuer
    broker, secret_file = file_broker(issuer, tmp_path, every="30d")
    env = {**os.environ, **broker.env}
    cmd = [sys.executable, "-m", "broker", "rotate", "main", "--auto", "--json",
           "--config", str(broker.config)]  # fmt: skip
    broker.start()
    try:
        wait_for(lambda: broker.state().get("current"), timeout=30, what="the survey")
        before = secret_file.read_text().strip()
        done = subprocess.run(cmd, env={**env, "TOKEN_BROKER_CLIENT_KEY": broker.key},
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        answer = json.loads(done.stdout)
        assert answer["where"] == "by the running daemon" and answer["outcome"] == "success"
        after = secret_file.read_text().strip()
        assert after != before and list(at_adobe(issuer).values()) == [after]
        # The daemon serves a token of the new secret at once.
        token = broker.get("/token").text
        assert issuer.issuer.minted[token].secret_uuid == answer["new"]
        # Asked again at once: the daemon refuses (each cycle creates and deletes a secret
        # at Adobe) and the command says so, and when it may be asked again.
        again = subprocess.run(cmd, env={**env, "TOKEN_BROKER_CLIENT_KEY": broker.key},
                               capture_output=True, text=True, timeout=120)  # fmt: skip
        assert again.returncode == 1 and again.stdout == ""
        assert again.stderr.startswith("token-broker: main was not cycled: credential 'main': "
                                       "the last secret cycle ran at "), again.stderr  # fmt: skip
        assert "may be asked for from" in again.stderr
        assert list(at_adobe(issuer).values()) == [after]
        broker.stop()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert json.loads(done.stdout)["where"].startswith("no daemon answered")
        assert list(at_adobe(issuer).values()) == [secret_file.read_text().strip()]
        for value in every_secret_sent(issuer):
            assert value not in done.stdout + done.stderr
    finally:
        assert_nothing_leaked(broker, issuer)


@pytest.mark.parametrize(
    ("ref", "says"),
    [("systemd:adobe", "systemd credential"), ("env:ADOBE_SECRET", "environment variable")],
)
def test_rotate_every_with_a_secret_it_cannot_write_is_refused(tmp_path, ref, says):
    main = {"provider": "adobe", "client_id": "x", "secret": ref, "credential_id": "1",
            "console_org_id": "2", "rotate_every": "30d"}  # fmt: skip
    config = config_file(tmp_path / "config.toml", {"main": main})
    done = subprocess.run([sys.executable, "-m", "broker", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode != 0
    assert f"{config}: [credentials.main] rotate_every: " in done.stderr
    assert says in done.stderr and 'use secret = "keyring"' in done.stderr


@pytest.mark.xdist_group("port-8765")
def test_the_demo_cycles_while_curl_keeps_getting_tokens(tmp_path):
    port = reserve_port()
    out = open(tmp_path / "demo.out", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "demo", "--rotate-every", "5s", "--lifetime", "60",
         "--listen", f"127.0.0.1:{port}"],
        stdout=out, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _get(url + "/healthz") == 200, timeout=20, what="the demo")
        failures = 0
        deadline = time.monotonic() + 60
        cycles = 0
        while time.monotonic() < deadline and cycles < 2:
            r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                "-H", "X-Token-Broker: 1", url + "/token"],
                               capture_output=True, text=True, timeout=10)  # fmt: skip
            failures += r.stdout != "200"
            metrics = httpx.get(url + "/metrics").text
            pattern = r'rotations_total\{credential="demo",outcome="success"\} (\d+)'
            found = re.search(pattern, metrics)
            cycles = int(found.group(1)) if found else 0
            time.sleep(0.1)
        assert cycles >= 2 and failures == 0
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        out.close()
    text = (tmp_path / "demo.out").read_text()
    assert "The client secret is cycled every 5s" in text and "cycle demo done" in text


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to plant another user's directory")
def test_a_state_directory_another_user_made_deletes_nothing(cycling_issuer, tmp_path):
    """The state directory pre-created by another user (0777), a two-field state file
    planted in it, no rotate_every: the daemon "resumed" the cycle at start and deleted its
    own secret at Adobe, and every refresh then failed with invalid_client."""
    import pwd

    issuer = cycling_issuer
    nobody = pwd.getpwnam("nobody").pw_uid
    state = tmp_path / "state" / "token-broker"
    (state / "cycling").mkdir(parents=True)
    planted = state / "cycling" / "main.json"
    planted.write_text(json.dumps({"credential_id": CRED_ID, "step": "adding"}))
    for path, mode in ((state, 0o777), (state / "cycling", 0o777), (planted, 0o666)):
        os.chown(path, nobody, nobody)
        path.chmod(mode)
    refused = f"{state} is owned by uid {nobody}, not by this user (uid 0)"
    broker, secret_file = file_broker(issuer, tmp_path, every="", ims=False)
    original = secret_file.read_text().strip()
    admin = {**HEADERS, "Authorization": f"Bearer {broker.key}"}
    broker.start()
    try:
        # It serves tokens and refuses to cycle from there, saying why, and deletes nothing.
        output = broker.proc.output  # type: ignore[union-attr]
        wait_for(lambda: refused in output() or issuer.issuer.console_calls,
                 what="the refusal in the log")  # fmt: skip
        assert issuer.issuer.console_calls == []
        assert f"chown 0 {state}" in output()
        status = broker.get("/v1/credentials/main").json()["secret_cycling"]
        assert refused in status["last_error"]["detail"]
        forced = httpx.post(broker.url + "/v1/credentials/main/refresh", headers=admin)
        assert forced.status_code == 200, forced.text
        assert broker.get("/token").status_code == 200
        asked = httpx.post(broker.url + "/v1/credentials/main/rotate", headers=admin)
        assert asked.status_code == 502 and refused in asked.json()["detail"]
        assert list(at_adobe(issuer).values()) == [original] == stored(secret_file)
        assert issuer.issuer.console_calls == []
    finally:
        assert_nothing_leaked(broker, issuer)
    # With an IMS listener the local CA would live there too: serve refuses to start.
    broker = Broker(issuer, tmp_path, f"file:{secret_file}", {}, every="", ims=True)
    done = subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--config", str(broker.config)],
        env={**os.environ, **broker.env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1 and refused in done.stderr, done.stderr
