"""broker.vault against a real OpenBao: KV v2, check-and-set, logins, renewal, failures."""

from __future__ import annotations

import asyncio
import logging
import signal

import pytest
from helpers import wait_for
from openbao import DevServer, RaftServer

from broker.errors import SecretError
from broker.vault import CasConflict, Login, Vault, VaultError

POLICY = """
path "secret/data/tb/*" { capabilities = ["read", "create", "update"] }
path "secret/metadata/tb/*" { capabilities = ["read", "list", "delete"] }
"""


def _fixed(value: str):  # type: ignore[no-untyped-def]
    async def read() -> str:
        return value

    return read


def token_login(token: str) -> Login:
    return Login("token", _fixed(token))


async def test_read_write_with_check_and_set_metadata_list_and_destroy(openbao: DevServer):
    vault = Vault(openbao.url, token_login(openbao.root_token))
    try:
        assert await vault.read("secret", "tb/adobe") is None
        first = await vault.write("secret", "tb/adobe", {"client_secret": "s1"}, cas=0)
        assert first.version == 1 and first.written > 0
        with pytest.raises(CasConflict) as lost:
            await vault.write("secret", "tb/adobe", {"client_secret": "other"}, cas=0)
        assert lost.value.reason == "conflict" and vault.health.ok  # a lost race, not a failure
        second = await vault.write("secret", "tb/adobe", {"client_secret": "s2"}, cas=1)
        doc = await vault.read("secret", "tb/adobe")
        assert doc is not None and doc.data == {"client_secret": "s2"} and doc.version == 2
        assert doc.written == second.written >= first.written
        meta = await vault.metadata("secret", "tb/adobe")
        assert meta is not None and meta.current_version == 2 and meta.updated == second.written
        await vault.write("secret", "tb/adobe/brokers/a", {"version": 2}, cas=None)
        await vault.write("secret", "tb/adobe/brokers/b", {"version": 1}, cas=None)
        assert await vault.keys("secret", "tb/adobe/brokers") == ["a", "b"]
        await vault.destroy("secret", "tb/adobe/brokers/a")
        assert await vault.keys("secret", "tb/adobe/brokers") == ["b"]
        assert await vault.keys("secret", "tb/nothing") == []
        assert await vault.metadata("secret", "tb/nothing") is None
    finally:
        await vault.aclose()


async def test_a_denied_path_is_named_and_the_token_never_appears(openbao: DevServer, caplog):
    openbao.put_policy("tb", POLICY)
    token = openbao.create_token(["tb"])
    vault = Vault(openbao.url, token_login(token))
    caplog.set_level(logging.DEBUG)
    try:
        with pytest.raises(VaultError) as denied:
            await vault.read("secret", "elsewhere")
        assert denied.value.reason == "denied" and denied.value.status == 403
        assert "GET secret/data/elsewhere" in str(denied.value)
        assert openbao.url in str(denied.value) and "permission denied" in str(denied.value)
        assert not vault.health.ok and vault.health.reason == "denied"
        await vault.write("secret", "tb/x", {"a": "b"}, cas=0)
        assert vault.health.ok
        assert token not in caplog.text and token not in str(denied.value)
    finally:
        await vault.aclose()


async def test_approle_login_renews_and_logs_in_again_past_the_max_ttl(openbao: DevServer):
    openbao.put_policy("tb", POLICY)
    role_id, secret_id = openbao.approle("broker", ["tb"], token_ttl="3s", token_max_ttl="6s")
    tokens: list[str] = []
    vault = Vault(
        openbao.url, Login("approle", _fixed(secret_id), role=role_id), on_token=tokens.append
    )
    keeper = asyncio.create_task(vault.keep_alive())
    try:
        await vault.write("secret", "tb/renewed", {"v": 1}, cas=0)
        first = tokens[-1]
        # Renewed (the same token again) at 2 s, then refused past 6 s: a new login.
        await _until(lambda: len(set(tokens)) >= 2, 20, "a second login past the max TTL")
        assert tokens.count(first) >= 2  # renewals hand back the same token first
        assert (await vault.read("secret", "tb/renewed")) is not None
    finally:
        keeper.cancel()
        await vault.aclose()


async def test_a_revoked_token_is_replaced_by_a_new_login_within_a_call_or_a_renewal(
    openbao: DevServer,
) -> None:
    openbao.put_policy("tb", POLICY)
    role_id, secret_id = openbao.approle("broker", ["tb"])
    tokens: list[str] = []
    vault = Vault(
        openbao.url, Login("approle", _fixed(secret_id), role=role_id), on_token=tokens.append
    )
    try:
        await vault.write("secret", "tb/x", {"v": 1}, cas=0)
        openbao.revoke_token(tokens[-1])
        doc = await vault.read("secret", "tb/x")  # 403, a new login, the same call again
        assert doc is not None and len(set(tokens)) == 2
        # A renewal refused (revoked; past the max TTL alike) and a login that works:
        # routine, not counted in the metrics' failures.
        openbao.revoke_token(tokens[-1])
        failures = dict(vault.health.errors)
        await vault._renew()
        assert len(set(tokens)) == 3 and vault.health.ok and vault.health.errors == failures
    finally:
        await vault.aclose()


async def test_jwt_login_reads_the_token_file_at_every_login(openbao: DevServer, tmp_path):
    openbao.put_policy("tb", POLICY)
    signer = openbao.jwt_auth("broker", ["tb"], subject="system:sa:tb", audience="vault")
    jwt_file = tmp_path / "token"
    jwt_file.write_text(signer.mint("system:sa:tb", "vault"))

    async def read() -> str:
        return jwt_file.read_text()

    vault = Vault(openbao.url, Login("jwt", read, role="broker"))
    try:
        await vault.write("secret", "tb/jwt", {"v": 1}, cas=0)
        jwt_file.write_text(signer.mint("system:sa:other", "vault"))  # the wrong subject now
        vault._token = None  # force a login: it reads the file again, and is refused
        with pytest.raises(VaultError) as refused:
            await vault.read("secret", "tb/jwt")
        assert refused.value.reason == "invalid" and "subject" in str(refused.value)
    finally:
        await vault.aclose()


async def test_an_unreadable_login_credential_is_a_clear_error(openbao: DevServer):
    async def broken() -> str:
        raise SecretError("credential 'vault': file /nope does not exist")

    vault = Vault(openbao.url, Login("approle", broken, role="r"))
    try:
        with pytest.raises(VaultError, match="cannot read the credential.*does not exist"):
            await vault.read("secret", "x")
        assert vault.health.reason == "invalid"
    finally:
        await vault.aclose()


async def test_sealed_and_stopped_servers_are_named(openbao_raft: RaftServer):
    openbao_raft.enable_kv2("secret")
    vault = Vault(openbao_raft.url, token_login(openbao_raft.root_token), timeout=5)
    try:
        await vault.write("secret", "tb/x", {"v": 1}, cas=None)
        openbao_raft.seal()
        with pytest.raises(VaultError) as sealed:
            await vault.read("secret", "tb/x")
        assert sealed.value.reason == "sealed" and sealed.value.status == 503
        openbao_raft.stop(signal.SIGKILL)
        with pytest.raises(VaultError) as down:
            await vault.read("secret", "tb/x")
        assert down.value.reason == "unreachable" and "refused" in str(down.value)
        assert vault.health.failures == 2
        openbao_raft.start()
        doc = await vault.read("secret", "tb/x")
        assert doc is not None and doc.data == {"v": 1} and vault.health.ok
    finally:
        await vault.aclose()


async def test_a_namespace_goes_in_its_header(openbao: DevServer):
    openbao.call("POST", "sys/namespaces/team-a")
    openbao.call(
        "POST", "sys/mounts/secret", json={"type": "kv", "options": {"version": "2"}},
        headers={"X-Vault-Namespace": "team-a"},
    )  # fmt: skip
    vault = Vault(openbao.url, token_login(openbao.root_token), namespace="team-a")
    try:
        await _until_ok(lambda: vault.write("secret", "tb/ns", {"v": 1}, cas=None))
        assert openbao.kv_read("secret", "tb/ns") is None  # not in the root namespace
        assert (await vault.read("secret", "tb/ns")) is not None
    finally:
        await vault.aclose()


async def test_capabilities_say_what_a_login_may_do(openbao: DevServer):
    openbao.put_policy("tb", POLICY)
    vault = Vault(openbao.url, token_login(openbao.create_token(["tb"])))
    try:
        caps = await vault.capabilities(["secret/data/tb/a", "secret/data/other"])
        assert set(caps["secret/data/tb/a"]) == {"read", "create", "update"}
        assert caps["secret/data/other"] == ("deny",)
    finally:
        await vault.aclose()


async def _until(predicate, limit: float, what: str) -> None:  # type: ignore[no-untyped-def]
    await asyncio.to_thread(wait_for, predicate, limit, what)


async def _until_ok(call, tries: int = 50) -> None:  # type: ignore[no-untyped-def]
    """A freshly mounted KV v2 answers "upgrading" for a moment: try until it serves."""
    for _ in range(tries - 1):
        try:
            await call()
            return
        except VaultError:
            await asyncio.sleep(0.1)
    await call()


@pytest.mark.parametrize(
    ("earlier", "later", "seconds"),
    [
        ("2026-10-25T02:59:59.512345678Z", "2026-10-25T03:00:01.123456789Z", 1.611111),
        ("2026-10-25T02:59:59Z", "2026-10-25T03:00:00.5Z", 1.5),  # with and without fraction
        ("2026-10-25T02:59:59+00:00", "2026-10-25T04:00:00.25+01:00", 1.25),
    ],
)
def test_vaults_times_keep_their_zone_whatever_the_local_one(
    monkeypatch: pytest.MonkeyPatch, earlier: str, later: str, seconds: float
) -> None:
    """Lease and report ages compare Vault's stamps: read as local time they would be an
    hour off across a DST change (Berlin's autumn change is at 01:00 UTC on that day)."""
    import time

    from broker.vault import _time

    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    try:
        assert _time(later) - _time(earlier) == pytest.approx(seconds, abs=1e-6)
        assert _time("2026-10-25T01:00:00Z") == 1792890000.0
        assert _time("2026-10-25T01:00:00") == 0.0  # no zone: unreadable, not local
    finally:
        monkeypatch.undo()
        time.tzset()
