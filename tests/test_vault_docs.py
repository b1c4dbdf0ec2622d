"""docs/vault.md (and the Vault rows of docs/security.md), run against a real OpenBao.

Each test takes its blocks from the documentation (``block("NAME")``, see
tests/doctext.py): the setup commands run with OpenBao's own ``bao`` against a
``bao server -dev`` of the test's, the policies are loaded into it and shown to
allow what the page says (through the broker's own Vault client, so the calls
are exactly the broker's), the ``doctor`` output and the log lines shown are
compared with a real run, and the status JSON, metrics and PromQL with a broker
process that loses and regains Vault. What a test changes in a block to run it
here is listed where it is done: Vault's address (``VAULT`` below), the
directories under ``/etc`` and ``/run`` (a temporary directory), the role_id
Vault chose, and the issuer's URL where a command would ask Adobe IMS.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import logging
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from doctext import CLIENT_ID, block, project_json, user_env, users_config
from helpers import (
    HEADERS,
    BrokerProcess,
    IssuerThread,
    ServerThread,
    TcpGate,
    config_file,
    make_ca_and_leaf,
    new_secret,
    reserve_port,
    wait_for,
)
from openbao import DevServer, bao_binary

from broker import config, stores
from broker.cycling import CycleState
from broker.cycling.fleet import VaultState
from broker.errors import ConfigError, CycleError
from broker.stores import Context, VaultRef, VaultSession
from broker.vault import Login, Vault, VaultError

#: The address the page shows; a test puts its own server's there (and back in output).
VAULT = "https://vault.example.com:8200"
MOUNT, PATH = "secret", "token-broker/adobe"
REF = f"vault:{MOUNT}/{PATH}"


def _policy_paths(hcl: str) -> dict[str, set[str]]:
    """The path -> capabilities of a policy in the simple form the docs write."""
    found = {}
    for path, caps in re.findall(r'path\s+"([^"]+)"\s*\{\s*capabilities\s*=\s*\[([^\]]*)\]', hcl):
        found[path] = set(re.findall(r'"([a-z]+)"', caps))
    return found


def _lines_in_order(wanted: str, output: str) -> None:
    """Assert that the lines of ``wanted`` are a run of consecutive lines of ``output``."""
    want, have = wanted.splitlines(), output.splitlines()
    for i in range(len(have) - len(want) + 1):
        if have[i : i + len(want)] == want:
            return
    raise AssertionError(f"not in the output:\n{wanted}\n--- output:\n{output}")


def _bao_env(server: DevServer, home: Path) -> dict[str, str]:
    """A user's environment (token-broker on PATH, HOME ``home``) with `bao` on PATH and
    the administrator's BAO_ADDR and BAO_TOKEN for ``server``; no other BAO_/VAULT_."""
    env = {k: v for k, v in user_env(home).items() if not k.startswith(("BAO_", "VAULT_"))}
    binary = bao_binary()
    assert binary is not None  # the openbao fixture skipped otherwise
    env["PATH"] = f"{Path(binary).parent}:{env['PATH']}"
    env.update(BAO_ADDR=server.url, BAO_TOKEN=server.root_token)
    return env


def _sh(body: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-e", "-o", "pipefail", "-c", body], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=120)  # fmt: skip


def _session(server: DevServer, token: str, poll: float = 1.0) -> VaultSession:
    async def read() -> str:
        return token

    return VaultSession(Vault(server.url, Login("token", read)), poll)


def _ref() -> VaultRef:
    parsed = stores.parse(REF, "adobe")
    assert isinstance(parsed, VaultRef)
    return parsed


def _as_logged(record: logging.LogRecord) -> str:
    """A record as the daemon's text log writes it: LEVEL logger: message."""
    return f"{record.levelname} {record.name}: {record.getMessage()}"


# -- setting it up: the policies, AppRole, the first secret, doctor ------------------------------


def test_the_setup_walkthrough_against_a_real_openbao(openbao: DevServer, issuer, tmp_path):  # type: ignore[no-untyped-def]
    """Steps 1 to 6 of "Set it up" as written: the policies and AppRole with `bao`, the
    [vault] table, `import --secret vault:…`, rotate_every, and `doctor`'s lines for the
    cycling policy and (the role switched to the reader's) for the reader policy."""
    home = tmp_path / "home"
    home.mkdir()
    etc = tmp_path / "etc"  # stands in for /etc/token-broker/
    etc.mkdir()
    env = _bao_env(openbao, home)
    (home / "token-broker-reader.hcl").write_text(block("vault-reader-policy"))
    (home / "token-broker.hcl").write_text(block("vault-cycler-policy"))

    done = _sh(block("vault-setup-policies"), env, home)
    assert done.returncode == 0, done.stderr
    for name in ("token-broker-reader", "token-broker"):
        assert openbao.call("GET", f"sys/policies/acl/{name}")["data"]["policy"]

    done = _sh(block("vault-setup-approle").replace("/etc/token-broker/", f"{etc}/"), env, home)
    assert done.returncode == 0, done.stderr
    role_id = openbao.call("GET", "auth/approle/role/token-broker/role-id")["data"]["role_id"]
    assert role_id in done.stdout  # printed for the config
    secret_id = etc / "vault-secret-id"
    assert secret_id.stat().st_mode & 0o077 == 0 and secret_id.read_text().strip()

    # Step 3: the [vault] table as shown; Vault's address, the role_id, /etc and a CA of ours.
    text = block("vault-config")
    shown_role_id = tomllib.loads(text)["vault"]["role_id"]
    ca = make_ca_and_leaf(tmp_path, "vault")[0]
    text = (text.replace(VAULT, openbao.url).replace(shown_role_id, role_id)
            .replace("/etc/token-broker/vault-ca.pem", str(ca))
            .replace("/etc/token-broker/", f"{etc}/"))  # fmt: skip
    users_config(home).write_text(text)
    cfg = home / ".config" / "token-broker" / "config.toml"

    # Step 4: import writes the secret to Vault (check-and-set) and the credential.
    secret = new_secret()
    issuer.issuer.add_client(CLIENT_ID, secret)
    project_json(home / "project.json", secret, cycling=True)
    done = _sh(block("vault-import").strip() + f" --ims-url {issuer.url}", env, home)
    assert done.returncode == 0, done.stderr
    assert openbao.kv_read(MOUNT, PATH) == ({"client_secret": secret}, 1)
    written = tomllib.loads(cfg.read_text())["credentials"]["adobe"]
    assert written["secret"] == REF
    assert written["credential_id"] and written["console_org_id"]
    # Again: the same secret is fine; another one is left alone without --force.
    again = _sh(block("vault-import").strip().replace("--name adobe", "--name adobe-2")
                + f" --ims-url {issuer.url}", env, home)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert openbao.kv_read(MOUNT, PATH)[0] == {"client_secret": secret}  # type: ignore[index]
    other = new_secret()
    issuer.issuer.add_client(CLIENT_ID, other)
    project_json(home / "other.json", other)
    refused = _sh(f"token-broker import other.json --name adobe-3 --secret {REF} "
                  f"--ims-url {issuer.url}", env, home)  # fmt: skip
    assert refused.returncode != 0 and "holds another secret" in refused.stderr
    assert openbao.kv_read(MOUNT, PATH)[0] == {"client_secret": secret}  # type: ignore[index]
    # `add … --secret vault:…` does the same for a credential typed in by hand (a secret of
    # its own, which the page's policy does not cover: the test's role gets that path too).
    openbao.put_policy("partner", 'path "secret/data/token-broker/partner" '
                       '{ capabilities = ["read", "create", "update"] }')  # fmt: skip
    openbao.call("POST", "auth/approle/role/token-broker",
                 json={"token_policies": ["token-broker", "partner"]})  # fmt: skip
    partner = new_secret()
    issuer.issuer.add_client("broker", partner)
    done = subprocess.run(
        ["token-broker", "add", "partner", "--provider", "oauth2", "--client-id", "broker",
         "--token-url", f"{issuer.url}/oauth2/token", "--secret-stdin",
         "--secret", "vault:secret/token-broker/partner"],
        input=partner, capture_output=True, text=True, env=env, cwd=home, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert openbao.kv_read(MOUNT, "token-broker/partner") == ({"client_secret": partner}, 1)
    done = _sh("token-broker remove partner && token-broker remove adobe-2", env, home)
    assert done.returncode == 0, done.stderr

    # Step 5: rotate_every on a broker whose login has the cycling policy; step 6: doctor.
    ids = 'console_org_id = "98765"\n'
    cfg.write_text(cfg.read_text().replace(ids, ids + 'rotate_every = "30d"\n'))
    doctor = _sh("token-broker doctor", env, home)
    output = (doctor.stdout + doctor.stderr).replace(openbao.url, VAULT)
    assert doctor.returncode == 0, output
    _lines_in_order(block("vault-doctor").rstrip("\n"), output)

    # The same broker with the reader's policy: doctor names what cycling lacks.
    openbao.call("POST", "auth/approle/role/token-broker",
                 json={"token_policies": ["token-broker-reader"]})  # fmt: skip
    doctor = _sh("token-broker doctor", env, home)
    output = (doctor.stdout + doctor.stderr).replace(openbao.url, VAULT)
    assert doctor.returncode == 1, output
    _lines_in_order(block("vault-doctor-reader").rstrip("\n"), output)
    for out in (done, again, refused, doctor):
        assert secret not in out.stdout + out.stderr and partner not in out.stdout + out.stderr
    assert secret_id.read_text().strip() not in output


async def test_the_first_secret_with_bao_kv_put(openbao: DevServer, tmp_path):  # type: ignore[no-untyped-def]
    """`bao kv put -cas=0 … client_secret=- < adobe.secret`: Vault keeps the file's final
    newline, the broker does not; a second put is refused (-cas=0)."""
    home = tmp_path / "home"
    home.mkdir()
    secret = new_secret()
    (home / "adobe.secret").write_text(secret + "\n")
    env = _bao_env(openbao, home)
    done = _sh(block("vault-bao-put"), env, home)
    assert done.returncode == 0, done.stderr
    assert openbao.kv_read(MOUNT, PATH) == ({"client_secret": secret + "\n"}, 1)
    assert secret not in done.stdout + done.stderr
    again = _sh(block("vault-bao-put"), env, home)
    assert again.returncode != 0 and "check-and-set" in again.stderr
    assert openbao.kv_read(MOUNT, PATH)[1] == 1  # type: ignore[index]

    session = _session(openbao, openbao.root_token)
    try:
        assert await _ref().read("adobe", Context(vault=session)) == (secret,)
        openbao.kv_write(MOUNT, PATH, {"client_secret": secret + "\r\n"})  # a Windows editor's
        assert await _ref().read("adobe", Context(vault=session)) == (secret,)
    finally:
        await session.vault.aclose()


# -- the policies --------------------------------------------------------------------------------


def test_the_cycling_policy_is_the_kubernetes_policy():
    """docs/vault.md and deploy/kubernetes/vault/vault-policy.hcl give one policy."""
    root = Path(__file__).resolve().parents[1]
    deployed = (root / "deploy" / "kubernetes" / "vault" / "vault-policy.hcl").read_text()
    assert _policy_paths(block("vault-cycler-policy")) == _policy_paths(deployed)
    reader = _policy_paths(block("vault-reader-policy"))
    cycler = _policy_paths(block("vault-cycler-policy"))
    assert all(reader[p] <= cycler[p] for p in reader)  # a cycler may do what a reader may


#: Calls neither policy allows, with what they would do: method, path under v1/, body.
FORBIDDEN = {
    "delete the newest version": ("DELETE", f"{MOUNT}/data/{PATH}", None),
    "delete versions": ("POST", f"{MOUNT}/delete/{PATH}", {"versions": [1]}),
    "undelete versions": ("POST", f"{MOUNT}/undelete/{PATH}", {"versions": [1]}),
    "destroy versions": ("POST", f"{MOUNT}/destroy/{PATH}", {"versions": [1]}),
    "delete the secret": ("DELETE", f"{MOUNT}/metadata/{PATH}", None),
    "change its metadata": ("POST", f"{MOUNT}/metadata/{PATH}", {"max_versions": 1}),
    "read another secret": ("GET", f"{MOUNT}/data/token-broker/other", None),
    "write another secret": ("POST", f"{MOUNT}/data/token-broker/other", {"data": {"a": "b"}}),
    "list the mount": ("LIST", f"{MOUNT}/metadata/", None),
}


def _forbidden(server: DevServer, token: str) -> None:
    for what, (method, path, body) in FORBIDDEN.items():
        answer = server.request(method, path, token=token, json=body)
        assert answer.status_code == 403, f"{what}: {answer.status_code} {answer.text}"


async def test_the_reader_policy_reads_and_reports_and_writes_nothing_else(openbao: DevServer):
    """A token with the reader policy (and `default`) reads the secret as the broker does
    and writes its report; it cannot write the secret, take the lease or read others'
    reports; and what docs/security.md says a stolen one can do, it can."""
    openbao.put_policy("token-broker-reader", block("vault-reader-policy"))
    openbao.kv_write(MOUNT, PATH, {"client_secret": "old"})
    openbao.kv_write(MOUNT, PATH, {"client_secret": "current", "client_secret_pending": "new"})
    openbao.kv_write(MOUNT, "token-broker/other", {"client_secret": "not yours"})
    openbao.kv_write(MOUNT, f"{PATH}/brokers/5d0e1c2b3a4f6789", {"version": 1})
    token = openbao.create_token(["token-broker-reader"])
    session = _session(openbao, token)
    ref = _ref()
    try:
        assert await ref.read("adobe", Context(vault=session)) == ("current", "new")
        assert await session.vault.metadata(MOUNT, PATH) is not None  # the poll
        for _ in range(2):  # created, then updated
            await ref.report("adobe", session)
        assert openbao.kv_read(MOUNT, ref.report_path(session.broker))[0]["version"] == 2  # type: ignore[index]
        with pytest.raises(VaultError) as denied:
            await ref.writer("adobe", Context(vault=session)).put_upcoming("mine")
        assert denied.value.reason == "denied"
        with pytest.raises(CycleError, match="cannot take the cycle lease"):
            async with VaultState("adobe", ref, session).locked():
                pass
        with pytest.raises(VaultError):
            await session.vault.keys(MOUNT, f"{PATH}/brokers")
        with pytest.raises(VaultError):
            await session.vault.read(MOUNT, f"{PATH}/brokers/5d0e1c2b3a4f6789")
    finally:
        await session.vault.aclose()
    _forbidden(openbao, token)
    # docs/security.md: a stolen reader login reads older versions too, and may write any
    # broker's report (forge one, or overwrite another's).
    old = openbao.request("GET", f"{MOUNT}/data/{PATH}", token=token, params={"version": "1"})
    assert old.json()["data"]["data"] == {"client_secret": "old"}
    forged = openbao.request("POST", f"{MOUNT}/data/{PATH}/brokers/5d0e1c2b3a4f6789",
                             token=token, json={"data": {"version": 2}})  # fmt: skip
    assert forged.status_code == 200
    assert openbao.kv_read(MOUNT, PATH)[0]["client_secret"] == "current"  # type: ignore[index]


async def test_the_cycling_policy_does_a_cycles_writes_and_no_more(
    openbao: DevServer, caplog, tmp_path
):  # type: ignore[no-untyped-def]
    """A token with the cycling policy runs every Vault call of a cycle through the broker's
    own code: the lease, the staging fields, the wait for every broker (a stale report
    removed, a lagging one named after rotate_grace); the log lines docs/vault.md shows
    are these; `bao` shows the lease and the reports; no version can be deleted."""
    openbao.put_policy("token-broker", block("vault-cycler-policy"))
    grace = 1.0
    # The page's example: brokers on version 6 when the switch writes version 7.
    for n in range(5):
        openbao.kv_write(MOUNT, PATH, {"client_secret": "old-secret-value", "n": n})
    openbao.kv_write(MOUNT, f"{PATH}/brokers/0000000000000000", {"version": 1})  # long gone
    stale = openbao.kv_metadata(MOUNT, f"{PATH}/brokers/0000000000000000")
    assert stale is not None
    token = openbao.create_token(["token-broker"])
    holder, other = _session(openbao, token), _session(openbao, token)
    ref = _ref()
    writer = ref.writer("adobe", Context(vault=holder))
    caplog.set_level(logging.INFO)

    def vault_time() -> str:  # Vault's clock, read from a write's time stamp
        answer = openbao.call("POST", f"{MOUNT}/data/clock", json={"data": {}})
        return str(answer["data"]["created_time"])

    try:
        state = VaultState("adobe", ref, holder, grace=grace)
        async with state.locked():
            await state.save(CycleState(credential_id="4566206088345", step="adding"))
            with pytest.raises(CycleError, match=r"holds the cycle lease, renewed \d+s ago"):
                async with VaultState("adobe", ref, other).locked():
                    pass
            openbao.kv_destroy(MOUNT, ref.report_path(other.broker))  # only the page's brokers
            # The stale report is older than the grace at the switch; the lagging one alive.
            wait_for(lambda: _seconds(vault_time()) - _seconds(stale["updated_time"]) > grace,
                     what="Vault's clock past the grace")  # fmt: skip
            openbao.kv_write(MOUNT, f"{PATH}/brokers/5d0e1c2b3a4f6789",
                             {"version": 6, "host": "host-b", "pid": 4242})  # fmt: skip
            await writer.put_upcoming("new-secret-value")
            pending = openbao.kv_read(MOUNT, PATH)[0]  # type: ignore[index]
            assert pending["client_secret_pending"] == "new-secret-value"
            await writer.promote()
            doc, version = openbao.kv_read(MOUNT, PATH)  # type: ignore[misc]
            assert version == 7 and doc["client_secret"] == "new-secret-value"
            assert doc["client_secret_previous"] == "old-secret-value"
            assert "client_secret_pending" not in doc
            switched = _seconds(openbao.kv_metadata(MOUNT, PATH)["updated_time"])  # type: ignore[index]
            wait_for(lambda: _seconds(vault_time()) - switched > grace,
                     what="Vault's clock past rotate_grace after the switch")  # fmt: skip
            await asyncio.wait_for(state.adopted(), 30)
            await writer.finish()
        assert openbao.kv_read(MOUNT, PATH) == ({"client_secret": "new-secret-value", "n": 4}, 8)
        reports = openbao.kv_list(MOUNT, f"{PATH}/brokers")
        assert "0000000000000000" not in reports and "5d0e1c2b3a4f6789" in reports
    finally:
        for s in (holder, other):
            await s.vault.aclose()
    _forbidden(openbao, token)

    logged = [_as_logged(r).replace(openbao.url, VAULT) for r in caplog.records]
    shown = block("vault-log-lines").splitlines()[2:]
    shown[1] = shown[1].replace("(300s)", f"({grace:g}s)")
    for line in shown:
        assert line in logged, f"{line}\n--- logged:\n" + "\n".join(logged)

    home = tmp_path / "home"
    home.mkdir()
    done = _sh(block("vault-inspect"), _bao_env(openbao, home), home)
    assert done.returncode == 0, done.stderr
    assert "current_version             8" in done.stdout
    assert holder.broker in done.stdout and "5d0e1c2b3a4f6789" in done.stdout
    assert "holder" in done.stdout and "secret-value" not in done.stdout


def _seconds(rfc3339: str) -> float:
    from broker.vault import _time

    return _time(rfc3339)


def test_every_token_needs_the_default_policy(openbao: DevServer):
    """renew-self, lookup-self and capabilities-self come from Vault's `default` policy."""
    openbao.put_policy("token-broker", block("vault-cycler-policy"))
    calls = [("POST", "auth/token/renew-self", {}), ("GET", "auth/token/lookup-self", None),
             ("POST", "sys/capabilities-self", {"paths": [f"{MOUNT}/data/{PATH}"]})]  # fmt: skip
    with_default = openbao.create_token(["token-broker"])
    without = openbao.create_token(["token-broker"], no_default_policy=True)
    for method, path, body in calls:
        assert openbao.request(method, path, token=with_default, json=body).status_code == 200
        assert openbao.request(method, path, token=without, json=body).status_code == 403


# -- a broker process: what it shows when Vault goes away and comes back -------------------------


@pytest.fixture
def vault_gate(openbao: DevServer) -> Iterator[TcpGate]:
    """A port in front of the OpenBao server that can refuse connections: Vault away."""
    gate = TcpGate(openbao.port)
    try:
        yield gate
    finally:
        gate.stop()


def _broker_config(path: Path, gate: TcpGate, token_file: Path, issuer: IssuerThread,
                   port: int, poll: str, **adobe: str) -> Path:  # fmt: skip
    return config_file(
        path,
        {"adobe": {"provider": "adobe", "client_id": CLIENT_ID, "ims_url": issuer.url,
                   "secret": REF, **adobe}},
        server={"listen": [f"127.0.0.1:{port}"]},
        refresh={"force_cooldown": "0s"},
        vault={"address": gate.url, "auth": "token", "token": f"file:{token_file}", "poll": poll},
    )  # fmt: skip


def _reader_broker(openbao: DevServer, issuer: IssuerThread, gate: TcpGate, tmp_path: Path,
                   secret: str, poll: str, **adobe: str) -> tuple[Path, str, str]:  # fmt: skip
    """A token of the docs' reader policy in a file, ``secret`` in Vault and known to the
    issuer, and the config of one broker reading it through ``gate``: (config, its URL,
    the Vault token)."""
    openbao.put_policy("token-broker-reader", block("vault-reader-policy"))
    token = openbao.create_token(["token-broker-reader"])
    token_file = tmp_path / "vault-token"
    token_file.write_text(token + "\n")  # as `bao token create … > file` leaves it
    token_file.chmod(0o600)
    issuer.issuer.add_client(CLIENT_ID, secret)
    openbao.kv_write(MOUNT, PATH, {"client_secret": secret}, cas=0)
    port = reserve_port()
    cfg = _broker_config(tmp_path / "config.toml", gate, token_file, issuer, port, poll, **adobe)
    return cfg, f"http://127.0.0.1:{port}", token


def _status(url: str) -> dict:  # type: ignore[type-arg]
    answer = httpx.get(url + "/v1/credentials/adobe", headers=HEADERS)
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


def test_a_broker_follows_vault_and_names_its_absence(openbao, issuer, vault_gate, tmp_path):  # type: ignore[no-untyped-def]
    """A reading broker (reader policy, poll 1 s): the status JSON's `vault` object as the
    page shows it; Vault away: tokens still served, the failure in the log, the status,
    `list --json` and the metrics (and the PromQL of the page over them); Vault back: the
    log says so and a new version is followed and reported. With the Console ids in its
    config but no rotate_every, the reader leaves the cycle's state alone.
    Neither the secret nor the Vault token appears anywhere."""
    secret, newer = new_secret(), new_secret()
    console = {"credential_id": "4566206088345", "console_org_id": "98765"}
    cfg, url, token = _reader_broker(openbao, issuer, vault_gate, tmp_path, secret, "1s", **console)
    broker = BrokerProcess(cfg, env={"XDG_STATE_HOME": str(tmp_path / "state")})
    shown = json.loads(block("vault-status"))["vault"]
    seen: list[str] = []
    try:
        broker.wait_healthy(url)
        wait_for(lambda: httpx.get(url + "/readyz").status_code == 200, what="a token")
        status = wait_for(lambda: (s := _status(url))["vault"]["ok"] and s, what="vault ok")
        assert set(status["vault"]) == set(shown)
        assert status["vault"]["address"] == vault_gate.url and status["vault"]["version"] == 1
        # The Console ids in its config, no rotate_every: it leaves cycles to the others and
        # does not read the cycle's state (its policy may not).
        assert "cycle" not in broker.output() and status["secret_cycling"] is None

        vault_gate.refuse()
        wait_for(lambda: "the secret in hand stays in use" in broker.output(), what="the warning")
        assert httpx.get(url + "/token", headers=HEADERS).status_code == 200
        forced = httpx.post(url + "/v1/credentials/adobe/refresh", headers=HEADERS)
        assert forced.status_code == 200, forced.text  # refreshes go on with the secret in hand
        away = _status(url)["vault"]
        assert not away["ok"] and away["failed_at"] and away["version"] == 1
        assert f"connection refused by {vault_gate.url}" in away["error"]
        assert type(away["error"]) is type(shown["error"]) and away["ok"] is shown["ok"]
        env = {**os.environ, "TOKEN_BROKER_URL": url}
        table = subprocess.run([sys.executable, "-m", "broker", "list"], capture_output=True,
                               text=True, env=env, timeout=60)  # fmt: skip
        listed = subprocess.run([sys.executable, "-m", "broker", "list", "--json"],
                                capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
        assert table.returncode == 0 and "adobe" in table.stdout and "fresh" in table.stdout
        assert not json.loads(listed.stdout)[0]["vault"]["ok"]
        metrics = httpx.get(url + "/metrics").text
        assert "\ntoken_broker_vault_up 0\n" in metrics
        assert 'token_broker_vault_failures_total{reason="unreachable"}' in metrics
        assert 'token_broker_secret_version{credential="adobe"} 1\n' in metrics
        seen += [table.stdout, listed.stdout, metrics, json.dumps(away)]

        vault_gate.forward()
        wait_for(lambda: "Vault answers again" in broker.output(), what="Vault back")
        issuer.issuer.add_client(CLIENT_ID, newer)
        openbao.kv_write(MOUNT, PATH, {"client_secret": newer})
        back = wait_for(lambda: (s := _status(url))["vault"]["version"] == 2 and s,
                        what="the new version followed")  # fmt: skip
        assert back["vault"]["ok"] and back["vault"]["error"]  # the last failure, as history
        reports = openbao.kv_list(MOUNT, f"{PATH}/brokers")
        assert len(reports) == 1
        wait_for(lambda: openbao.kv_read(MOUNT, f"{PATH}/brokers/{reports[0]}")[0]["version"] == 2,
                 what="the report of version 2")  # fmt: skip
        report = openbao.kv_read(MOUNT, f"{PATH}/brokers/{reports[0]}")[0]  # type: ignore[index]
        assert report["pid"] == broker.proc.pid and report["host"]
        scrape_text = httpx.get(url + "/metrics").text
        assert 'token_broker_secret_version{credential="adobe"} 2\n' in scrape_text
        seen += [scrape_text, json.dumps(back)]
    finally:
        broker.stop()
    output = broker.output()
    # The first call to fail is the poll's metadata read, or (if Vault went between the two)
    # the report that follows it: the page shows the first.
    logged = re.sub(
        r"POST secret/data/token-broker/adobe/brokers/[0-9a-f]+:",
        "GET secret/metadata/token-broker/adobe:",
        output.replace(vault_gate.url, VAULT),
    )
    for line in block("vault-log-lines").splitlines()[:2]:
        assert line in logged, f"{line}\n--- log:\n{output}"
    for text in [output, *seen]:
        assert secret not in text and newer not in text and token not in text

    from promql import Scrape, evaluate

    evaluate(Scrape.parse(metrics), commands_of(block("vault-promql")), tmp_path)


def commands_of(body: str) -> list[str]:
    return [line for line in body.splitlines() if line.strip() and not line.startswith("#")]


def test_a_broker_started_without_vault_reads_it_at_the_next_poll(  # type: ignore[no-untyped-def]
    openbao, issuer, vault_gate, tmp_path
):
    """Vault away at start (poll 1 s): the credential is failed and the log says no secret
    was read yet; once Vault answers, the next poll reads the secret and a token is
    fetched, with no reload."""
    secret = new_secret()
    cfg, url, _ = _reader_broker(openbao, issuer, vault_gate, tmp_path, secret, "1s")
    vault_gate.refuse()
    broker = BrokerProcess(cfg, env={"XDG_STATE_HOME": str(tmp_path / "state")})
    try:
        broker.wait_healthy(url)
        wait_for(lambda: _status(url)["state"] == "failed", what="failed")
        wait_for(lambda: "no secret read yet; reading again every 1s" in broker.output(),
                 what="the follower's warning")  # fmt: skip
        assert "the secret in hand stays in use" not in broker.output()  # there is none
        vault_gate.forward()
        wait_for(lambda: _status(url)["state"] == "fresh", timeout=15, what="a token, no reload")
        assert httpx.get(url + "/token", headers=HEADERS).status_code == 200
    finally:
        broker.stop()
    output = broker.output()
    assert secret not in output
    assert f"vault {vault_gate.url}: vault {vault_gate.url}" not in output  # said once


def test_a_broker_started_without_vault_and_one_refused_by_the_issuer(  # type: ignore[no-untyped-def]
    openbao, issuer, vault_gate, tmp_path
):
    """Vault away at start: the credential is failed (secret_unavailable, Vault named), and
    `list` shows it; `token-broker reload` once Vault answers brings it back. A change to
    [vault] waits for a restart. With poll 60 s (no follow in between), `invalid_client`
    reads Vault at once and the same token request succeeds with the new version."""
    secret, newer = new_secret(), new_secret()
    cfg, url, _ = _reader_broker(openbao, issuer, vault_gate, tmp_path, secret, "60s")
    vault_gate.refuse()
    broker = BrokerProcess(cfg, env={"XDG_STATE_HOME": str(tmp_path / "state")})
    env = {**os.environ, "TOKEN_BROKER_URL": url}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "broker", *args, "--config", str(cfg)],
                              capture_output=True, text=True, env=env, timeout=60)  # fmt: skip

    try:
        broker.wait_healthy(url)
        failed = wait_for(lambda: (s := _status(url))["state"] == "failed" and s, what="failed")
        assert failed["last_error"]["error"] == "secret_unavailable"
        assert vault_gate.url in failed["last_error"]["description"]
        listed = cli("list")
        assert "failed" in listed.stdout and "secret_unavailable" in listed.stdout
        assert vault_gate.url in listed.stdout

        vault_gate.forward()
        assert cli("reload").returncode == 0
        wait_for(lambda: _status(url)["state"] == "fresh", what="the secret read at the reload")

        # [vault] is read at start: a reload with another address keeps the running one.
        text = cfg.read_text()
        cfg.write_text(text.replace(vault_gate.url, "http://127.0.0.1:9"))
        reloaded = cli("reload")
        assert reloaded.returncode == 0 and "restart_needed: [vault]" in reloaded.stdout
        assert "the [vault] table changes only at a restart" in broker.output()
        assert _status(url)["vault"]["address"] == vault_gate.url
        cfg.write_text(text)

        issuer.issuer.add_client(CLIENT_ID, newer)
        openbao.kv_write(MOUNT, PATH, {"client_secret": newer})
        issuer.issuer.clients[CLIENT_ID].discard(secret)  # the issuer refuses the old one now
        forced = httpx.post(url + "/v1/credentials/adobe/refresh", headers=HEADERS)
        assert forced.status_code == 200, forced.text
        assert _status(url)["vault"]["version"] == 2
        assert "the issuer refused the secret held; using the one stored now" in broker.output()
    finally:
        broker.stop()
    assert secret not in broker.output() and newer not in broker.output()


# -- Vault Agent ---------------------------------------------------------------------------------


def test_vault_agent_renders_what_the_broker_reads(openbao: DevServer, tmp_path):  # type: ignore[no-untyped-def]
    """The page's Vault Agent config, run by `bao agent` (AppRole with the reader policy):
    the rendered secret is a `file:` secret, the token sink an `auth = "token"` source;
    `doctor --offline` reads the secret through each."""
    openbao.put_policy("token-broker-reader", block("vault-reader-policy"))
    role_id, secret_id = openbao.approle("token-broker", ["token-broker-reader"])
    secret = new_secret()
    openbao.kv_write(MOUNT, PATH, {"client_secret": secret}, cas=0)
    etc, run = tmp_path / "etc-vault-agent", tmp_path / "run-vault-agent"
    etc.mkdir(mode=0o700)
    run.mkdir(mode=0o700)
    (etc / "role-id").write_text(role_id)
    (etc / "secret-id").write_text(secret_id)
    agent_config = tmp_path / "token-broker.hcl"
    agent_config.write_text(block("vault-agent-config").replace(VAULT, openbao.url)
                            .replace("/etc/vault-agent/", f"{etc}/")
                            .replace("/run/vault-agent/", f"{run}/"))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_"))}
    binary = bao_binary()
    assert binary is not None
    with open(tmp_path / "agent.log", "wb") as log:
        agent = subprocess.Popen(
            [binary, "agent", f"-config={agent_config}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**env, "HOME": str(tmp_path)},
        )
    try:
        wait_for(lambda: (run / "adobe.secret").exists() and (run / "token").exists(),
                 timeout=30, what="the agent's files")  # fmt: skip
        wait_for(lambda: (run / "adobe.secret").read_text() == secret, what="the rendered secret")
        home = tmp_path / "home"
        home.mkdir()
        shown = {"file": block("vault-agent-file"), "token": block("vault-agent-token")}
        for name, text in shown.items():
            fragment = text.replace(VAULT, openbao.url).replace("/run/vault-agent/", f"{run}/")
            cfg = config_file(home / f"{name}.toml", {"adobe": {"provider": "adobe",
                              "client_id": CLIENT_ID}}, toml=fragment)  # fmt: skip
            done = subprocess.run([sys.executable, "-m", "broker", "doctor", "--offline",
                                   "--config", str(cfg)], capture_output=True, text=True,
                                  env=user_env(home), timeout=120)  # fmt: skip
            assert done.returncode == 0, done.stdout + done.stderr
            assert "ok  secret of 'adobe' resolvable" in done.stdout
            assert secret not in done.stdout + done.stderr
    finally:
        agent.terminate()
        agent.wait(timeout=15)


# -- docs/security.md: the Vault token goes to Vault and nowhere else ----------------------------


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every request with ``answer`` (status, headers, body) and records its path
    and headers in the server's ``seen``."""

    def _any(self) -> None:
        self.server.seen.append((self.path, dict(self.headers)))  # type: ignore[attr-defined]
        status, headers, body = self.server.answer  # type: ignore[attr-defined]
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_CONNECT = _any

    def log_message(self, *args: object) -> None:
        pass


def _recorder(status: int, headers: dict[str, str], body: bytes) -> ServerThread:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.seen = []  # type: ignore[attr-defined]
    server.answer = (status, headers, body)  # type: ignore[attr-defined]
    return ServerThread(server).start()


def _url(thread: ServerThread) -> str:
    return f"http://127.0.0.1:{thread.server.server_address[1]}"


async def test_the_vault_token_goes_to_vault_and_nowhere_else(monkeypatch):  # type: ignore[no-untyped-def]
    """A standby's 307 is not followed (the token never reaches the other address); a proxy
    in the environment is not used; an http address on another host is a config error."""
    elsewhere = _recorder(200, {"Content-Type": "application/json"}, b'{"data": {}}')
    ok = b'{"data": {"data": {"client_secret": "x"}, "metadata": {"version": 1}}}'
    vault = _recorder(200, {"Content-Type": "application/json"}, ok)
    redirecting = _recorder(307, {"Location": _url(elsewhere) + "/v1/secret/data/a"}, b"")
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, _url(elsewhere))
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)

    async def token() -> str:
        return "hvs.the-vault-token"

    try:
        client = Vault(_url(redirecting), Login("token", token))
        with pytest.raises(VaultError):
            await client.read("secret", "a")
        await client.aclose()
        client = Vault(_url(vault), Login("token", token))
        assert (await client.read("secret", "a")) is not None
        await client.aclose()
        assert elsewhere.server.seen == []  # type: ignore[attr-defined]
        assert redirecting.server.seen and vault.server.seen  # type: ignore[attr-defined]
        sent = vault.server.seen[-1][1]  # type: ignore[attr-defined]
        assert sent["X-Vault-Token"] == "hvs.the-vault-token"
    finally:
        for server in (elsewhere, vault, redirecting):
            server.stop()
    table = {"address": "http://vault.example.com:8200", "auth": "token", "token": "file:/t"}
    with pytest.raises(ConfigError, match=r"\[vault\] address: expected an https:// address"):
        config.parse({"vault": table})
    config.parse({"vault": {**table, "address": "http://127.0.0.1:8200"}})


async def test_an_answer_that_is_not_vaults_is_a_failure_not_an_absent_secret():  # type: ignore[no-untyped-def]
    """A proxy's page with 200 (or any body that is not a JSON object) is not "no such
    secret": a report read so would be skipped instead of judged, a secret called absent."""
    page = _recorder(200, {"Content-Type": "text/html"}, b"<html>Sign in to the proxy</html>")

    async def token() -> str:
        return "hvs.the-vault-token"

    client = Vault(_url(page), Login("token", token))
    try:
        with pytest.raises(VaultError, match="not a JSON object"):
            await client.read("secret", "a")
        assert not client.health.ok and client.health.errors["error"] >= 1
    finally:
        await client.aclose()
        page.stop()
