"""A secret in Vault shared by a fleet (broker/stores/vault.py, broker/cycling/fleet.py),
in-process against a real OpenBao: reading, the staging fields, the lease, the reports.

The brokers' processes, cycles under load and kills are in tests/integration/test_fleet.py.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest
from openbao import DevServer

from broker import stores
from broker.cycling import CycleState
from broker.cycling.fleet import VaultState
from broker.errors import CycleError, SecretError
from broker.stores import Context, VaultRef, VaultSession
from broker.vault import Login, Vault

REF = "vault:secret/tb/adobe#client_secret"


def session(openbao: DevServer, poll: float = 1.0) -> VaultSession:
    async def token() -> str:
        return openbao.root_token

    return VaultSession(Vault(openbao.url, Login("token", token)), poll)


def ref() -> VaultRef:
    parsed = stores.parse(REF, "adobe")
    assert isinstance(parsed, VaultRef)
    return parsed


async def test_the_secret_in_use_first_then_the_new_then_the_old(openbao: DevServer):
    s = session(openbao)
    ctx = Context(vault=s)
    with pytest.raises(SecretError, match="does not exist.*--secret vault:secret/tb/adobe"):
        await ref().read("adobe", ctx)
    openbao.kv_write("secret", "tb/adobe", {"other": "x"})
    with pytest.raises(SecretError, match=r"has no such field \(version 1 has: other\)"):
        await ref().read("adobe", ctx)
    staged = {"client_secret": "cur", "client_secret_pending": "new",
              "client_secret_previous": "old", "other": "x"}  # fmt: skip
    openbao.kv_write("secret", "tb/adobe", staged)
    assert await ref().read("adobe", ctx) == ("cur", "new", "old")
    assert s.versions["adobe"] == 2
    with pytest.raises(SecretError, match="needs the \\[vault\\] table"):
        await ref().read("adobe")
    await s.vault.aclose()


async def test_a_new_credentials_secret_is_written_once_and_kept_apart(openbao: DevServer):
    s = session(openbao)
    ctx = Context(vault=s)
    stored = await ref().store_new("adobe", ["first", "second"], ctx=ctx)
    assert stored.count == 2 and openbao.url in stored.where
    data, version = openbao.kv_read("secret", "tb/adobe")  # type: ignore[misc]
    assert data == {"client_secret": "first", "client_secret_pending": "second"} and version == 1
    # The same secret again, by a login that may only read: nothing to write, so no refusal.
    openbao.put_policy("ro", 'path "secret/data/tb/*" { capabilities = ["read"] }')
    reader = openbao.create_token(["ro"])

    async def read_only() -> str:
        return reader

    ro = VaultSession(Vault(openbao.url, Login("token", read_only)), 1.0)
    again = await ref().store_new("adobe", ["first"], ctx=Context(vault=ro))
    assert "already" in again.where and openbao.kv_read("secret", "tb/adobe")[1] == 1  # type: ignore[index]
    await ro.vault.aclose()
    with pytest.raises(SecretError, match="holds another secret; pass --force"):
        await ref().store_new("adobe", ["another"], ctx=ctx)
    openbao.kv_write("secret", "tb/adobe", {**data, "note": "kept"})
    await ref().store_new("adobe", ["another"], force=True, ctx=ctx)
    assert openbao.kv_read("secret", "tb/adobe")[0]["note"] == "kept"  # type: ignore[index]
    await s.vault.aclose()


async def test_the_staging_fields_of_a_cycle_each_a_version_with_check_and_set(openbao):
    s = session(openbao)
    openbao.kv_write("secret", "tb/adobe", {"client_secret": "old", "note": "kept"})
    writer = ref().writer("adobe", Context(vault=s))
    assert (await writer.current(), await writer.upcoming()) == ("old", None)
    await writer.put_upcoming("new")
    assert await ref().read("adobe", Context(vault=s)) == ("old", "new")
    await writer.promote()
    await writer.promote()  # repeated after a crash: nothing more changes
    data, version = openbao.kv_read("secret", "tb/adobe")  # type: ignore[misc]
    assert data == {"client_secret": "new", "client_secret_previous": "old", "note": "kept"}
    assert version == 3
    await writer.finish()
    assert openbao.kv_read("secret", "tb/adobe")[0] == {"client_secret": "new", "note": "kept"}  # type: ignore[index]
    await writer.put_upcoming("later")
    await writer.drop_upcoming()
    assert openbao.kv_read("secret", "tb/adobe")[0] == {"client_secret": "new", "note": "kept"}  # type: ignore[index]
    await s.vault.aclose()


async def test_a_write_that_loses_a_race_reads_again_and_keeps_the_other_change(openbao):
    s = session(openbao)
    openbao.kv_write("secret", "tb/adobe", {"client_secret": "old"})
    writer = ref().writer("adobe", Context(vault=s))
    real_write = s.vault.write
    raced = []

    async def racing_write(mount, path, data, *, cas):  # type: ignore[no-untyped-def]
        if not raced:  # a person's `bao kv patch` comes between our read and our write
            raced.append(openbao.kv_write("secret", "tb/adobe", {"client_secret": "old",
                                                                 "note": "theirs"}))  # fmt: skip
        return await real_write(mount, path, data, cas=cas)

    s.vault.write = racing_write  # type: ignore[method-assign]
    await writer.put_upcoming("new")
    data = openbao.kv_read("secret", "tb/adobe")[0]  # type: ignore[index]
    assert data == {"client_secret": "old", "note": "theirs", "client_secret_pending": "new"}
    await s.vault.aclose()


async def test_one_broker_holds_the_lease_and_another_takes_it_once_it_lapses(openbao):
    """The lease expires 3 x poll after its holder's last write, by Vault's clock."""
    a, b = session(openbao, poll=1.0), session(openbao, poll=1.0)
    first = VaultState("adobe", ref(), a)
    second = VaultState("adobe", ref(), b)
    async with first.locked():
        await first.save(CycleState(credential_id="c1", step="adding", before=["u1"]))
        with pytest.raises(CycleError) as busy:
            async with second.locked():
                pass
        assert busy.value.outcome == "busy" and a.broker in str(busy.value)
        assert await first.fence() > 0
        await asyncio.sleep(2.5)  # the holder's own task renews it meanwhile
        with pytest.raises(CycleError, match="holds the cycle lease"):
            async with second.locked():
                pass
    async with second.locked():  # released: at once
        state = await second.load("c1")
        assert (state.step, state.before) == ("adding", ["u1"])  # any broker resumes it
    # A holder that dies (no release, no renewal): the lease lapses after 3 polls.
    await first._acquire()
    taken = time.monotonic()
    while True:
        try:
            async with second.locked():
                break
        except CycleError:
            await asyncio.sleep(0.2)
    assert time.monotonic() - taken >= 2.0
    with pytest.raises(CycleError):  # the old holder may change nothing at Adobe now
        first._confirmed = -1e9
        await first.fence()
    for s in (a, b):
        await s.vault.aclose()


async def test_the_old_secret_waits_for_every_broker_alive_at_the_switch(openbao, caplog):
    openbao.kv_write("secret", "tb/adobe", {"client_secret": "old"})
    holder, other = session(openbao, poll=1.0), session(openbao, poll=1.0)
    state = VaultState("adobe", ref(), holder, grace=6.0)
    async with state.locked():
        await ref().read("adobe", Context(vault=other))  # the other broker holds version 1
        await ref().report("adobe", other)
        openbao.kv_write("secret", "tb/adobe", {"client_secret": "new"})  # the switch
        waited = asyncio.create_task(state.adopted())
        await asyncio.sleep(1.5)
        assert not waited.done()  # the other broker still reports version 1
        await ref().read("adobe", Context(vault=other))
        await ref().report("adobe", other)
        await asyncio.wait_for(waited, 10)
        # Alive at the next switch, then silent (it lost Vault): waited for until the grace,
        # and named.
        openbao.kv_write("secret", "tb/adobe", {"client_secret": "newer"})
        started = time.monotonic()
        await asyncio.wait_for(state.adopted(), 20)
        assert time.monotonic() - started >= 4.0
        assert f"{other.broker} (" in caplog.text and "at version 2" in caplog.text
        # Silent for longer than 3 polls before a switch: gone, not waited for.
        await asyncio.sleep(3.5)
        openbao.kv_write("secret", "tb/adobe", {"client_secret": "newest"})
        started = time.monotonic()
        await asyncio.wait_for(state.adopted(), 20)
        assert time.monotonic() - started < 3.0
    lost = session(openbao, poll=1.0)
    await ref().report("adobe", lost)
    await asyncio.sleep(6.5)  # longer than the grace before the next switch: gone
    async with state.locked():
        openbao.kv_write("secret", "tb/adobe", {"client_secret": "last"})
        await state.adopted()
    listed = openbao.kv_list("secret", "tb/adobe/brokers")
    assert lost.broker not in listed and holder.broker in listed  # a stale report removed
    for s in (holder, other, lost):
        await s.vault.aclose()


async def test_a_broker_follows_new_versions_and_reports_the_one_in_use(openbao):
    openbao.kv_write("secret", "tb/adobe", {"client_secret": "v1"})
    s = session(openbao, poll=0.2)
    ctx = Context(vault=s)
    held: list[tuple[str, ...]] = []

    async def reread(name: str) -> None:
        held.append(await ref().read(name, ctx))

    follower = asyncio.create_task(ref().follow("adobe", s, reread))
    try:
        await _until(lambda: held == [("v1",)])
        openbao.kv_write("secret", "tb/adobe", {"client_secret": "v2"})
        await _until(lambda: held[-1] == ("v2",))
        await _until(lambda: (openbao.kv_read("secret", f"tb/adobe/brokers/{s.broker}") or
                              ({}, 0))[0].get("version") == 2)  # fmt: skip
        assert len(held) == 2  # one read per new version, not one per poll
    finally:
        follower.cancel()
        await s.vault.aclose()


async def _until(predicate, limit: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_after_vault_failed_the_holder_waits_three_polls_of_fresh_reports(openbao):
    from broker.vault import VaultError

    openbao.kv_write("secret", "tb/adobe", {"client_secret": "new"})
    holder = session(openbao, poll=1.0)
    state = VaultState("adobe", ref(), holder, grace=60.0)
    real = holder.vault.metadata
    failed: list[float] = []

    async def once_down(mount, path):  # type: ignore[no-untyped-def]
        if not failed:
            failed.append(time.monotonic())
            raise VaultError("vault: down for a moment", reason="unreachable")
        return await real(mount, path)

    async with state.locked():
        holder.vault.metadata = once_down  # type: ignore[method-assign]
        await asyncio.wait_for(state.adopted(), 20)
    # Nothing lagged, yet it judged only after 3 polls of reports read after the failure.
    assert time.monotonic() - failed[0] >= 3.0
    await holder.vault.aclose()


async def test_a_mount_that_requires_check_and_set_takes_reports_and_the_lease(openbao):
    """`cas_required` on the mount: every write of the fleet's is a check-and-set one (the
    reports were not: every heartbeat failed, and no cycle could take the lease)."""
    openbao.enable_kv2("strict", cas_required=True)
    strict = stores.parse("vault:strict/tb/adobe#client_secret", "adobe")
    assert isinstance(strict, VaultRef)
    openbao.kv_write("strict", "tb/adobe", {"client_secret": "old"}, cas=0)
    s = session(openbao)
    for _ in range(2):
        await strict.report("adobe", s)
    state = VaultState("adobe", strict, s)
    async with state.locked():
        await state.save(CycleState(credential_id="c1", step="adding", before=["u1"]))
    assert openbao.kv_read("strict", f"tb/adobe/brokers/{s.broker}")[1] == 3  # type: ignore[index]
    # A report removed meanwhile (as a holder removes one of a broker gone): written anew.
    openbao.call("DELETE", f"strict/metadata/tb/adobe/brokers/{s.broker}")
    await strict.report("adobe", s)
    assert openbao.kv_read("strict", f"tb/adobe/brokers/{s.broker}")[1] == 1  # type: ignore[index]
    await s.vault.aclose()


async def test_a_lease_or_secret_deleted_by_hand_is_written_anew(openbao):
    """`bao kv delete` of the cycle document leaves its metadata: the next lease is written
    with check-and-set on the version the metadata counts, not 0 (busy forever, before)."""
    s = session(openbao)
    state = VaultState("adobe", ref(), s)
    async with state.locked():
        await state.save(CycleState(credential_id="c1"))
    openbao.call("DELETE", "secret/data/tb/adobe/cycle")  # soft delete: the newest version
    async with state.locked():
        assert (await state.load("c1")).step is None
    # The same for a secret deleted so: `import --secret vault:…` writes it anew.
    openbao.kv_write("secret", "tb/adobe", {"client_secret": "gone"})
    openbao.call("DELETE", "secret/data/tb/adobe")
    await ref().store_new("adobe", ["anew"], ctx=Context(vault=s))
    assert openbao.kv_read("secret", "tb/adobe") == ({"client_secret": "anew"}, 2)
    await s.vault.aclose()


async def test_brokers_with_different_polls_judge_by_the_longer(openbao):
    """A holder that renews every 3 s and a contender that polls every 0.5 s: the
    contender waits 3 x 3 s, not 3 x 0.5 s (it took a live lease before); a report of a
    broker that polls every 3 s counts as alive as long."""
    slow, quick = session(openbao, poll=3.0), session(openbao, poll=0.5)
    holder = VaultState("adobe", ref(), slow)
    await holder._acquire()  # held, not renewed: its last write is now
    await asyncio.sleep(2.0)  # > 3 x 0.5 s, < 3 x 3 s
    with pytest.raises(CycleError) as busy:
        async with VaultState("adobe", ref(), quick).locked():
            pass
    assert busy.value.outcome == "busy"
    openbao.kv_write("secret", "tb/adobe", {"client_secret": "old"})
    await ref().read("adobe", Context(vault=slow))
    await ref().report("adobe", slow)  # the slow broker uses version 1
    await asyncio.sleep(2.0)
    openbao.kv_write("secret", "tb/adobe", {"client_secret": "new"})  # the switch
    contender = VaultState("adobe", ref(), quick, grace=60.0)
    await ref().read("adobe", Context(vault=quick))  # the contender uses version 2
    assert await contender._lagging(
        (await ref().report("adobe", quick)).written, 2, time.time()
    ) == [f"{slow.broker} ({socket.gethostname()[:64]} pid {os.getpid()}) at version 1"]
    for s in (slow, quick):
        await s.vault.aclose()


async def test_a_key_under_brokers_that_no_broker_writes_is_not_judged(openbao):
    """Anyone who may report may write any key under brokers/: one Vault will not read back
    (`%2E%2E`), or any other name, is skipped, not a Vault failure that holds the cycle."""
    openbao.kv_write("secret", "tb/adobe", {"client_secret": "new"})
    s = session(openbao)
    for key in ("%252E%252E", "not-a-broker"):
        openbao.call("POST", f"secret/data/tb/adobe/brokers/{key}", json={"data": {"version": 0}})
    state = VaultState("adobe", ref(), s, grace=60.0)
    async with state.locked():
        await asyncio.wait_for(state.adopted(), 10)
    await s.vault.aclose()


async def test_reports_written_at_once_by_one_broker_do_not_conflict(openbao):
    """The follower's heartbeat and a cycle's own report (taking the lease, judging the
    brokers) may write this broker's report at the same moment: one after the other, each
    check-and-set on the version the other wrote (a cycle failed with a conflict before)."""
    s = session(openbao)
    for _ in range(3):
        await asyncio.gather(*(ref().report("adobe", s) for _ in range(4)))
    assert openbao.kv_read("secret", f"tb/adobe/brokers/{s.broker}")[1] == 12  # type: ignore[index]
    await s.vault.aclose()
