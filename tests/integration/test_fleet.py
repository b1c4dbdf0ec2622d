"""One secret for a fleet: several broker processes, one credential, its secret in a real
OpenBao, cycled through the test issuer's I/O Management API.

Each broker is ``token-broker serve`` with ``secret = "vault:secret/tb/main"`` and a
``[vault]`` login of its own (AppRole with the cycler's or the reader's minimal policy,
or a token from a file). Under continuous load: one cycle per period across the
fleet, never two at once, never more than two secrets at Adobe, no failed token
request, a broker without ``rotate_every`` following every version. Then the broker
holding the cycle's lease killed at each step the issuer can hold, every broker killed
at once, Vault stopped in the middle of a cycle, one broker cut off from Vault: the
fleet finishes or undoes the cycle and Adobe ends with one secret, the one Vault holds.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from helpers import (
    HEADERS,
    BrokerProcess,
    IssuerThread,
    Repeated,
    TcpGate,
    config_file,
    new_secret,
    reserve_port,
    rotations,
    wait_for,
)
from openbao import OpenBao

CLIENT = "broker-client"
CONSOLE_ORG = "4711"
CRED_ID = "88301"
MOUNT, PATH = "secret", "tb/main"
POLL = "1s"

#: The minimal policies of docs/vault.md, for this secret.
READER = f"""
path "{MOUNT}/data/{PATH}" {{ capabilities = ["read"] }}
path "{MOUNT}/metadata/{PATH}" {{ capabilities = ["read"] }}
path "{MOUNT}/data/{PATH}/brokers/*" {{ capabilities = ["create", "update"] }}
"""
CYCLER = f"""
path "{MOUNT}/data/{PATH}" {{ capabilities = ["read", "create", "update"] }}
path "{MOUNT}/metadata/{PATH}" {{ capabilities = ["read"] }}
path "{MOUNT}/data/{PATH}/cycle" {{ capabilities = ["read", "create", "update"] }}
path "{MOUNT}/data/{PATH}/brokers/*" {{ capabilities = ["read", "create", "update"] }}
path "{MOUNT}/metadata/{PATH}/brokers/" {{ capabilities = ["list"] }}
path "{MOUNT}/metadata/{PATH}/brokers/*" {{ capabilities = ["delete"] }}
"""


@dataclass
class Member:
    """One broker of the fleet: its config, its process, its login's secrets."""

    name: str
    tmp: Path
    issuer: IssuerThread
    vault_url: str
    login: dict[str, object]  # the [vault] keys of its login
    every: str = ""  # rotate_every ("": it only follows)
    grace: str = "30s"
    port: int = field(default_factory=reserve_port)
    proc: BrokerProcess | None = None
    logs: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {"XDG_STATE_HOME": str(self.tmp / f"state-{self.name}")}
        main: dict[str, object] = {
            "provider": "adobe", "client_id": CLIENT, "org_id": "ABC@AdobeOrg",
            "scopes": ["openid", "AdobeID"], "secret": f"vault:{MOUNT}/{PATH}",
            "ims_url": self.issuer.url, "console_url": self.issuer.url,
            "credential_id": CRED_ID, "console_org_id": CONSOLE_ORG,
            "rotate_verify": "20s", "rotate_grace": self.grace,
        }  # fmt: skip
        if self.every:
            main["rotate_every"] = self.every
        self.config = config_file(
            self.tmp / f"{self.name}.toml",
            {"main": main},
            server={"listen": [f"127.0.0.1:{self.port}"]},
            refresh={"force_cooldown": "0s"},
            toml=_vault_table(self.vault_url, self.login),
        )

    def start(self) -> Member:
        self.proc = BrokerProcess(self.config, env=self.env)
        self.proc.wait_healthy(self.url)
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.proc.kill()  # SIGKILL: nothing of the broker's runs after it
        self.proc.proc.wait()
        self.stop()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.logs.append(self.proc.output())
            self.proc = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.proc.pid

    def status(self) -> dict[str, object]:
        return httpx.get(self.url + "/v1/credentials/main", headers=HEADERS, timeout=10).json()  # type: ignore[no-any-return]

    def rotations(self, outcome: str = "success") -> int:
        return rotations(self.url, outcome)

    def output(self) -> str:
        return "\n".join([*self.logs, self.proc.output() if self.proc else ""])


def _vault_table(url: str, login: dict[str, object]) -> str:
    lines = ["[vault]", f'address = "{url}"', f'poll = "{POLL}"', 'timeout = "5s"']
    lines += [f'{k} = "{v}"' for k, v in login.items()]
    return "\n".join(lines) + "\n"


class Fleet:
    """The issuer, Vault, and the brokers; what Adobe and Vault hold at any moment."""

    def __init__(self, issuer: IssuerThread, vault: OpenBao, tmp: Path) -> None:
        self.issuer, self.vault, self.tmp = issuer, vault, tmp
        self.members: list[Member] = []
        self.secret = new_secret()
        issuer.issuer.add_client(CLIENT, self.secret)
        issuer.issuer.add_console(CLIENT, CONSOLE_ORG, CRED_ID)
        vault.kv_write(MOUNT, PATH, {"client_secret": self.secret})
        vault.put_policy("cycler", CYCLER)
        vault.put_policy("reader", READER)
        self.logins: list[str] = []  # every secret_id and token the brokers log in with
        self.most = 0  # the most secrets Adobe held at once, as sampled

    def approle(self, policy: str) -> dict[str, object]:
        role_id, secret_id = self.vault.approle(f"{policy}-{len(self.logins)}", [policy])
        path = self.tmp / f"secret-id-{len(self.logins)}"
        path.write_text(secret_id + "\n")
        path.chmod(0o600)
        self.logins.append(secret_id)
        return {"auth": "approle", "role_id": role_id, "secret_id": f"file:{path}"}

    def token(self, policy: str) -> dict[str, object]:
        token = self.vault.create_token([policy, "default"])
        path = self.tmp / f"token-{len(self.logins)}"
        path.write_text(token + "\n")
        path.chmod(0o600)
        self.logins.append(token)
        return {"auth": "token", "token": f"file:{path}"}

    def member(self, name: str, login: dict[str, object], **kw: object) -> Member:
        m = Member(name, self.tmp, self.issuer, self.vault.url, login, **kw)  # type: ignore[arg-type]
        self.members.append(m)
        return m

    def at_adobe(self) -> dict[str, str]:
        found = {s.uuid: s.value for s in self.issuer.issuer.secrets_of(CLIENT)}
        self.most = max(self.most, len(found))
        return found

    def in_vault(self) -> dict[str, object]:
        found = self.vault.kv_read(MOUNT, PATH)
        assert found is not None
        return found[0]

    def lease(self) -> dict[str, object]:
        found = self.vault.kv_read(MOUNT, f"{PATH}/cycle")
        return found[0] if found else {}

    def settled(self) -> bool:
        """A cycle finished or undone: no step, Adobe holds exactly the secret Vault holds."""
        state = self.lease().get("state") or {}
        doc = self.in_vault()
        return (
            isinstance(state, dict)
            and state.get("step") is None
            and set(self.at_adobe().values()) == {doc.get("client_secret")}
            and set(doc) == {"client_secret"}
        )

    def holder(self) -> Member:
        pid = self.lease().get("pid")
        return next(m for m in self.members if m.proc is not None and m.pid == pid)

    def stop(self) -> None:
        for m in self.members:
            m.stop()

    def check_nothing_leaked(self) -> None:
        text = "\n".join(m.output() for m in self.members)
        sent = {r.form.get("client_secret", "") for r in self.issuer.issuer.received} - {""}
        for value in sent | set(self.issuer.issuer.made.values()) | set(self.logins):
            assert value not in text, "a secret or a Vault login appeared in a broker's output"
        for token in self.issuer.issuer.issued:
            assert token not in text, "a token appeared in a broker's output"
        assert self.vault.root_token not in text


class Sampler:
    """What Adobe holds, sampled every 20 ms while a test runs (the most at once)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.fleet.at_adobe()
            time.sleep(0.02)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@contextlib.contextmanager
def under_load(fleet: Fleet, members: list[Member]) -> Iterator[Repeated]:
    """Every broker's ``GET /token`` asked continuously; every failure kept by name."""
    issued = fleet.issuer.issuer.issued
    with contextlib.ExitStack() as stack:

        def asker(member: Member) -> Callable[[], str | None]:
            client = stack.enter_context(httpx.Client(base_url=member.url, headers=HEADERS,
                                                      timeout=10))  # fmt: skip

            def ask() -> str | None:
                r = client.get("/token")
                ok = r.status_code == 200 and r.text in issued
                return None if ok else f"HTTP {r.status_code} {r.text[:80]}"

            return ask

        asks = {m.name: asker(m) for m in members}
        with Repeated(pause=0.02, **asks) as running:
            yield running


@pytest.fixture
def fleet(issuer: IssuerThread, openbao: OpenBao, tmp_path: Path) -> Iterator[Fleet]:
    found = Fleet(issuer, openbao, tmp_path)
    try:
        yield found
    finally:
        issuer.issuer.hold = set()
        issuer.issuer.release()
        found.stop()
        found.check_nothing_leaked()


def cycles(members: list[Member]) -> int:
    return sum(m.rotations() for m in members if m.proc is not None)


def figures(**values: object) -> None:
    """Print what a run measured (``pytest -s``): the figures of docs/reliability.md."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[-1].split(" ")[0]
    print(f"\nfigures {test}: " + ", ".join(f"{k}={v}" for k, v in values.items()))


def console(fleet: Fleet, method: str) -> list[object]:
    return [c for c in fleet.issuer.issuer.console_calls if c.method == method]


def test_a_fleet_cycles_once_per_period_and_no_token_request_fails(fleet: Fleet):
    """Two brokers may cycle (every 5 s), a third only follows: under load on all three,
    one cycle per period, never two at once, at most two secrets at Adobe, no failed
    request, and the old secret deleted only when every broker uses the new one."""
    fleet.issuer.issuer.lifetime = 4  # every broker refreshes every few seconds meanwhile
    a = fleet.member("a", fleet.approle("cycler"), every="5s").start()
    b = fleet.member("b", fleet.token("cycler"), every="5s").start()
    c = fleet.member("c", fleet.approle("reader")).start()
    started = time.monotonic()
    with Sampler(fleet), under_load(fleet, [a, b, c]) as load:
        wait_for(lambda: cycles([a, b]) >= 3, timeout=90, what="three cycles")
        elapsed = time.monotonic() - started
        wait_for(fleet.settled, timeout=30, what="the last cycle settled")
        # The follower uses the version Vault holds now.
        version = fleet.vault.kv_read(MOUNT, PATH)[1]  # type: ignore[index]
        wait_for(lambda: (c.status()["vault"] or {}).get("version") == version,  # type: ignore[union-attr]
                 timeout=10, what="the follower on the newest version")  # fmt: skip
    done = cycles([a, b])
    assert load.failures == [], load.failures[:5]
    assert all(n > 50 for n in load.counts.values()), load.counts
    # One cycle per period across the fleet (the next is due 5 s after the secret in use was
    # created, + <5% jitter): two brokers that may cycle do not make it two per period. The
    # first may come at once (the secret imported before the brokers started is old enough).
    made = [call.at for call in console(fleet, "POST")]
    assert all(later - earlier >= 4.99 for earlier, later in itertools.pairwise(made)), made
    # Never two at once: no cycle failed (a second one at once would meet Adobe's limit of
    # two secrets), every POST of a new secret was one cycle's (a next one may have begun).
    assert [m.rotations(o) for m in (a, b) for o in ("error", "conflict")] == [0, 0, 0, 0]
    posts, deletes = len(made), len(console(fleet, "DELETE"))
    assert done <= deletes <= posts <= deletes + 1 and posts <= done + 1, (done, posts, deletes)
    assert fleet.most <= 2
    # The old secret was deleted only once every broker had moved on: no broker ever
    # presented a secret after its DELETE (it would have met invalid_client).
    deleted_at = {
        c.path.rsplit("/", 1)[1]: c.at
        for c in fleet.issuer.issuer.console_calls  # type: ignore[attr-defined]
        if c.method == "DELETE"  # type: ignore[attr-defined]
    }
    for uuid, when in deleted_at.items():
        value = fleet.issuer.issuer.made[uuid]
        late = [r for r in fleet.issuer.issuer.received
                if r.form.get("client_secret") == value and r.at > when]  # fmt: skip
        assert late == [], f"a broker presented secret {uuid} after its DELETE"
    assert c.rotations() == 0  # the follower never cycled
    assert (c.status()["vault"] or {}).get("ok") is True  # type: ignore[union-attr]
    gaps = [round(later - earlier, 1) for earlier, later in itertools.pairwise(made)]
    figures(cycles=done, seconds=round(elapsed, 1), posts=posts, gaps_s=gaps, deletes=deletes,
            most_at_adobe=fleet.most, requests=dict(load.counts),
            failed=len(load.failures))  # fmt: skip


@pytest.mark.parametrize("event", ["POST", "POST_APPLIED", "DELETE"])
def test_the_cycling_broker_killed_at_a_step_another_finishes_or_undoes_it(fleet, event):
    """POST: killed before Adobe made a secret; POST_APPLIED: Adobe made one whose value
    never arrived; DELETE: killed in step 5, the new secret in use. The other broker takes
    the lease when it lapses and finishes or undoes the cycle."""
    a = fleet.member("a", fleet.approle("cycler"), every="4s").start()
    b = fleet.member("b", fleet.approle("cycler"), every="4s").start()
    fleet.issuer.issuer.hold = {event}
    wait_for(lambda: event in fleet.issuer.issuer.held, timeout=60, what=f"{event} held")
    holder = fleet.holder()
    holder.kill()
    killed = time.monotonic()
    other = b if holder is a else a
    fleet.issuer.issuer.hold = set()
    fleet.issuer.issuer.release()
    with Sampler(fleet), under_load(fleet, [other]) as load:
        wait_for(lambda: other.rotations() >= 1 or fleet.settled(), timeout=60,
                 what="the other broker finished or undid the cycle")  # fmt: skip
        wait_for(fleet.settled, timeout=60, what="one secret at Adobe, the one in Vault")
        settled = time.monotonic() - killed
    assert load.failures == [], load.failures[:5]
    assert fleet.most <= 2
    r = httpx.get(other.url + "/token", headers=HEADERS, timeout=10)
    assert r.status_code == 200 and r.text in fleet.issuer.issuer.issued
    figures(settled_after_kill_s=round(settled, 1), most_at_adobe=fleet.most,
            requests=load.served, failed=len(load.failures))  # fmt: skip


def test_every_broker_killed_at_once_then_restarted_with_empty_state(fleet: Fleet):
    members = [fleet.member(n, fleet.approle("cycler"), every="4s") for n in "abc"]
    for m in members:
        m.start()
    fleet.issuer.issuer.hold = {"POST_APPLIED"}
    wait_for(lambda: "POST_APPLIED" in fleet.issuer.issuer.held, timeout=60, what="POST held")
    for m in members:
        m.kill()
    fleet.issuer.issuer.hold = set()
    fleet.issuer.issuer.release()
    assert len(fleet.at_adobe()) == 2  # the lost POST's secret is there, its value lost
    for m in members:
        m.env = {"XDG_STATE_HOME": str(fleet.tmp / f"fresh-{m.name}")}  # nothing kept locally
        m.start()
    restarted = time.monotonic()
    with Sampler(fleet):
        wait_for(fleet.settled, timeout=90, what="one secret at Adobe, the one in Vault")
    settled = time.monotonic() - restarted
    assert fleet.most <= 2
    for m in members:
        r = httpx.get(m.url + "/token", headers=HEADERS, timeout=10)
        assert r.status_code == 200 and r.text in fleet.issuer.issuer.issued
    figures(settled_after_restart_s=round(settled, 1), most_at_adobe=fleet.most)


def test_vault_stopped_during_a_cycle_every_broker_serves_and_nothing_is_deleted(
    issuer: IssuerThread, openbao_raft: OpenBao, tmp_path: Path
):
    openbao_raft.enable_kv2(MOUNT)
    fleet = Fleet(issuer, openbao_raft, tmp_path)
    try:
        a = fleet.member("a", fleet.approle("cycler"), every="4s").start()
        b = fleet.member("b", fleet.approle("reader")).start()
        issuer.issuer.hold = {"POST"}
        wait_for(lambda: "POST" in issuer.issuer.held, timeout=60, what="POST held")
        deletes = len(console(fleet, "DELETE"))
        openbao_raft.stop(signal.SIGKILL)
        stopped = time.monotonic()
        issuer.issuer.hold = set()
        issuer.issuer.release()  # the POST makes a secret; its value cannot be stored
        with Sampler(fleet), under_load(fleet, [a, b]) as load:
            wait_for(lambda: not (a.status()["vault"] or {}).get("ok", True),  # type: ignore[union-attr]
                     timeout=30, what="the broker to see Vault gone")  # fmt: skip
            time.sleep(6)  # longer than the lease: nothing may happen at Adobe meanwhile
            assert len(console(fleet, "DELETE")) == deletes
            for m in (a, b):
                r = httpx.post(m.url + "/v1/credentials/main/refresh", headers=HEADERS,
                               timeout=30)  # fmt: skip
                assert r.status_code == 200, r.text  # refreshes with the secret in hand
            away = time.monotonic() - stopped
            deleted_while_away = len(console(fleet, "DELETE")) - deletes
            openbao_raft.start()  # the same data, unsealed
            back = time.monotonic()
            wait_for(fleet.settled, timeout=90, what="the cycle completed after Vault")
            wait_for(lambda: a.rotations() >= 1, timeout=90, what="a cycle after Vault came back")
            wait_for(fleet.settled, timeout=90, what="settled again")
            completed = time.monotonic() - back
        assert load.failures == [], load.failures[:5]
        assert fleet.most <= 2
        figures(vault_away_s=round(away, 1), deleted_while_away=deleted_while_away,
                completed_after_return_s=round(completed, 1), most_at_adobe=fleet.most,
                requests=dict(load.counts), failed=len(load.failures))  # fmt: skip
    finally:
        issuer.issuer.hold = set()
        issuer.issuer.release()
        fleet.stop()
        fleet.check_nothing_leaked()


def test_a_broker_cut_off_from_vault_is_waited_for_then_recovers(fleet: Fleet):
    """The cycling broker waits for a broker alive at the switch up to rotate_grace and
    names it; once the old secret is gone that broker recovers as soon as it reads Vault."""
    gate = TcpGate(int(fleet.vault.url.rsplit(":", 1)[1]))
    try:
        a = fleet.member("a", fleet.approle("cycler"), every="1h", grace="6s").start()
        c = Member("c", fleet.tmp, fleet.issuer, f"http://127.0.0.1:{gate.port}",
                   fleet.approle("reader"))  # fmt: skip
        fleet.members.append(c)
        c.start()
        wait_for(lambda: fleet.vault.kv_list(MOUNT, f"{PATH}/brokers") and len(
            fleet.vault.kv_list(MOUNT, f"{PATH}/brokers")) == 2, timeout=20,
            what="both brokers reporting")  # fmt: skip
        gate.refuse()  # c can no longer reach Vault
        started = time.monotonic()
        r = httpx.post(a.url + "/v1/credentials/main/rotate", headers=HEADERS, timeout=90)
        assert r.status_code == 200, r.text
        waited = time.monotonic() - started
        assert waited >= 5  # it waited for c, up to the grace
        assert re.search(r"these brokers still use an older version: \w+ \(.* pid "
                         rf"{c.pid}\) at version 1", a.output())  # fmt: skip
        # c still serves its token; a refresh meets invalid_client and cannot read Vault.
        assert httpx.get(c.url + "/token", headers=HEADERS, timeout=10).status_code == 200
        refused = httpx.post(c.url + "/v1/credentials/main/refresh", headers=HEADERS, timeout=30)
        assert refused.status_code == 502 and "invalid_client" in refused.text
        assert (c.status()["vault"] or {}).get("ok") is False  # type: ignore[union-attr]
        assert c.status()["state"] == "failed"
        code, listed = run_cli("list", "--url", c.url)
        assert code == 0 and "VAULT" in listed and "failing" in listed, listed
        assert f"vault http://127.0.0.1:{gate.port}" in listed  # the failure, named
        gate.forward()  # by itself, as soon as it reads Vault: the new secret, a new token
        reachable = time.monotonic()
        wait_for(lambda: c.status()["state"] == "fresh", timeout=20, what="c recovered")
        figures(
            rotate_waited_s=round(waited, 1),
            grace_s=6,
            recovered_after_vault_reachable_s=round(time.monotonic() - reachable, 1),
        )
        assert (c.status()["vault"] or {}).get("ok") is True  # type: ignore[union-attr]
        wait_for(fleet.settled, timeout=30, what="one secret, the one in Vault")
    finally:
        gate.stop()


# -- the commands, with a [vault] table ------------------------------------------------------


def run_cli(*argv: str, stdin: str = "", env: dict[str, str] | None = None) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "broker", *argv], input=stdin, capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=90,
    )  # fmt: skip
    return done.returncode, done.stdout + done.stderr


def test_import_and_add_write_the_secret_to_vault_when_the_login_may(fleet: Fleet):
    """`import --secret vault:…` and `add --secret vault:…` put the secret into Vault with
    check-and-set; a login whose policy may only read is refused, saying so."""
    fleet.vault.put_policy("importer", f'path "{MOUNT}/data/tb/*" '
                           '{ capabilities = ["read", "create", "update"] }')  # fmt: skip
    importer, reader = fleet.approle("importer"), fleet.approle("reader")
    cfg = fleet.tmp / "cli.toml"
    # A daemon address nobody serves: the CLI asks no other test's daemon (8765) to reload.
    nobody = f'[server]\nlisten = ["127.0.0.1:{reserve_port()}"]\n'
    cfg.write_text(nobody + _vault_table(fleet.vault.url, importer))
    project = {"project": {"name": "fleet", "org": {"id": "4711", "ims_org_id": "A@AdobeOrg"},
               "workspace": {"details": {"credentials": [{
                   "id": "99", "name": "x", "integration_type": "oauth_server_to_server",
                   "oauth_server_to_server": {"client_id": "imported", "client_secrets": [
                       "IMPORTED-SECRET-VALUE"], "scopes": ["openid"]}}]}}}}  # fmt: skip
    (fleet.tmp / "project.json").write_text(json.dumps(project))
    code, out = run_cli("import", str(fleet.tmp / "project.json"), "--config", str(cfg),
                        "--name", "imported", "--secret", f"vault:{MOUNT}/tb/imported",
                        "--no-verify", "--keep")  # fmt: skip
    assert code == 0, out
    assert fleet.vault.kv_read(MOUNT, "tb/imported")[0] == {  # type: ignore[index]
        "client_secret": "IMPORTED-SECRET-VALUE"
    }
    assert 'secret = "vault:secret/tb/imported"' in cfg.read_text()
    code, out = run_cli("add", "added", "--client-id", "c2", "--config", str(cfg), "--secret",
                        f"vault:{MOUNT}/{PATH}#other", "--secret-stdin", "--no-verify",
                        stdin="ADDED-SECRET-VALUE\n")  # fmt: skip
    assert code == 0, out
    # The document's other field (the fleet's secret) is kept; check-and-set on its version.
    assert fleet.in_vault() == {"client_secret": fleet.secret, "other": "ADDED-SECRET-VALUE"}
    # A reader's login may not write: refused, the config left as it was.
    cfg.write_text(nobody + _vault_table(fleet.vault.url, reader))
    code, out = run_cli("add", "refused", "--client-id", "c3", "--config", str(cfg), "--secret",
                        f"vault:{MOUNT}/tb/refused", "--secret-stdin", "--no-verify",
                        stdin="REFUSED-SECRET-VALUE\n")  # fmt: skip
    assert code == 1 and "HTTP 403" in out and "permission denied" in out, out
    assert "refused" not in cfg.read_text() and fleet.vault.kv_read(MOUNT, "tb/refused") is None
    for secret in ("IMPORTED-SECRET-VALUE", "ADDED-SECRET-VALUE", "REFUSED-SECRET-VALUE"):
        assert secret not in out


def test_doctor_checks_the_login_the_policy_and_the_field(fleet: Fleet):
    cycler = fleet.member("cycler", fleet.approle("cycler"), every="30d")
    code, out = run_cli("doctor", "--offline", "--config", str(cycler.config))
    assert code == 0, out
    assert f"ok  Vault {fleet.vault.url}: logged in (approle)" in out
    assert "ok  Vault policy of 'main' lets this broker cycle it" in out
    assert (
        "ok  secret of 'main' resolvable (Vault secret secret/tb/main field 'client_secret')" in out
    )
    # A reader's policy where rotate_every asks for a cycler's: named, with what is missing.
    reader = fleet.member("reader", fleet.approle("reader"), every="30d")
    code, out = run_cli("doctor", "--offline", "--config", str(reader.config))
    assert code == 1
    assert "FAIL  Vault policy of 'main' does not let this broker cycle it: needs " in out
    assert f"create, update on {MOUNT}/data/{PATH};" in out
    # A field that is not there.
    fleet.vault.kv_write(MOUNT, PATH, {"something_else": "x"})
    code, out = run_cli("doctor", "--offline", "--config", str(cycler.config))
    assert code == 1 and "has no such field (version 2 has: something_else)" in out, out
    assert fleet.secret not in out and all(s not in out for s in fleet.logins)
