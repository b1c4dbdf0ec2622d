"""Secret cycling (broker/cycling/) against the demo issuer's I/O Management API.

The issuer runs in-process (httpx's ASGI transport) under a fake clock; the
secret is a real file. A crash is a checkpoint that raises: the cycle is
abandoned at that exact step boundary with everything durable as it is (the
file, the state file, the issuer), and a new Cycle picks it up, as a daemon
restarted after kill -9 would. The process-level kills are in
tests/integration/test_cycling.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

import httpx
import pytest
from helpers import FakeClock, FakeScheduler, config_file, settings, wait_for
from issuer import TestIssuer

from broker.cycling import Cycle, Cycler, CycleState, StateFile
from broker.cycling.cycler import States
from broker.errors import ConfigError, CycleError
from broker.logs import Redactor
from broker.manager import Manager
from broker.providers.adobe import MANAGEMENT_SCOPES

CLIENT = "cycling-client"
ORG = "4711"
CRED_ID = "88301"
URL = "https://issuer.test"


class Crash(BaseException):
    """kill -9 at a step boundary: nothing after it runs, not even except/finally cleanups
    of the cycle (a BaseException passes `except CycleError` and `except Exception`)."""


class World:
    """The issuer, the secret file and the state directory of one credential."""

    def __init__(self, tmp_path: Path, **keys: object) -> None:
        self.clock = FakeClock()
        self.issuer = TestIssuer(clock=self.clock)
        self.original = self.issuer.add_client(CLIENT, "the-original-secret-value")
        self.issuer.add_console(CLIENT, ORG, CRED_ID)
        self.secret_file = tmp_path / "adobe.secret"
        self.secret_file.write_text("the-original-secret-value\n")
        self.secret_file.chmod(0o600)
        self.state_dir = tmp_path / "state"
        table = {**_table(self), "rotate_verify": "20s", **keys}
        self.cred = settings({"adobe": table}).credentials["adobe"]
        self.redactor = Redactor()
        self.switched: list[tuple[str, object]] = []

    def cycle(self, crash_at: str | None = None) -> Cycle:
        def checkpoint(point: str) -> None:
            if point == crash_at:
                raise Crash(point)

        async def on_switch(secret: str, issued: object) -> None:
            self.switched.append((secret, issued))

        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.issuer))
        return Cycle(
            self.cred,  # type: ignore[arg-type]
            client=client,
            store=self.cred.secret.writer("adobe"),
            state=StateFile(self.state_dir, "adobe"),
            clock=self.clock,
            sleep=self.clock.sleep,
            redactor=self.redactor,
            on_switch=on_switch,
            checkpoint=checkpoint,
        )

    @property
    def at_adobe(self) -> dict[str, str]:
        """uuid -> value of the secrets the issuer holds now."""
        return {s.uuid: s.value for s in self.issuer.secrets_of(CLIENT)}

    def stored(self) -> list[str]:
        found = [self.secret_file.read_text().strip()]
        upcoming = self.secret_file.with_name("adobe.secret.next")
        if upcoming.exists():
            found.append(upcoming.read_text().strip())
        return found

    def state(self) -> dict[str, object]:
        return json.loads((self.state_dir / "cycling" / "adobe.json").read_text())

    def check_invariants(self) -> None:
        """What must hold at any moment: at most 2 secrets at Adobe, and a stored
        secret that Adobe accepts (never the only working secret gone)."""
        values = set(self.at_adobe.values())
        assert len(values) <= 2
        assert any(v in values for v in self.stored()), "no stored secret works at Adobe"

    async def daemon(
        self, rand: float = 0.0, states: States | None = None, **keys: object
    ) -> tuple[Manager, Cycler, FakeScheduler]:
        """The daemon's manager and cycler for this credential, started, jobs in the test's
        hand (a FakeScheduler); ``keys`` are added to the credential's table; the cycle's
        state in ``states`` (default: a file in the state directory)."""
        parsed = settings({"adobe": {**_table(self), **keys}})
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.issuer))
        sched = FakeScheduler()
        manager = Manager(parsed, client=client, clock=self.clock, scheduler=sched,
                          rand=lambda: rand)  # fmt: skip
        cycler = Cycler(
            holder=manager, issuers=manager.issuers, scheduler=sched,
            states=states or (lambda name, cred: StateFile(self.state_dir, name)), clock=self.clock,
            recorder=manager.recorder, redactor=manager.redactor, rand=lambda: rand,
            sleep=self.clock.sleep,
        )  # fmt: skip
        await manager.start()
        await manager.first_round()
        await cycler.use(parsed.credentials)
        return manager, cycler, sched

    def check_done(self) -> None:
        """A finished (or undone) cycle: one secret, the stored one, nothing pending."""
        assert list(self.at_adobe.values()) == self.stored()
        assert self.state()["step"] is None


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


async def test_a_cycle_replaces_the_secret_and_deletes_the_old_one_with_the_new(world):
    result = await world.cycle().run()
    assert result.outcome == "success" and result.old == world.original.uuid
    (new_uuid, new_value), = world.at_adobe.items()  # fmt: skip
    assert new_uuid == result.new and new_value != "the-original-secret-value"
    assert world.secret_file.read_text() == new_value + "\n"
    assert oct(world.secret_file.stat().st_mode & 0o777) == "0o600"
    assert not world.secret_file.with_name("adobe.secret.next").exists()
    assert world.state()["current"] == new_uuid and world.state()["step"] is None
    calls = [(c.method, c.minted_by) for c in world.issuer.console_calls]
    old, new = world.original.uuid, new_uuid
    # list + add with the old secret's token; list, delete, list with the new secret's
    # (both must be listed before the old one is deleted, and it must be gone after).
    assert calls == [("GET", old), ("POST", old), ("GET", new), ("DELETE", new), ("GET", new)]
    # The management token had exactly the management scopes; the proof of the new secret
    # asked for the credential's own scopes, and that token went to the daemon (on_switch).
    mgmt = [m for m in world.issuer.minted.values() if "manage_client_secrets" in m.scopes]
    assert {m.scopes for m in mgmt} == {frozenset(MANAGEMENT_SCOPES)}
    (secret, issued), = world.switched  # fmt: skip
    assert secret == new_value
    assert world.issuer.minted[issued.token.access_token].scopes == {"openid", "AdobeID"}
    # Management tokens are registered for redaction (they live 24 h at Adobe).
    for token, minted in world.issuer.minted.items():
        if minted.scopes == frozenset(MANAGEMENT_SCOPES):
            assert token not in world.redactor(f"x {token} y")


async def test_two_secrets_and_one_not_ours_stops_and_names_both(world):
    other = world.issuer.add_client(CLIENT, "someone-elses-second-secret")
    with pytest.raises(CycleError) as info:
        await world.cycle().run()
    err = info.value
    assert err.outcome == "conflict"
    assert world.original.uuid in str(err) and other.uuid in str(err)
    assert "created 2027-" in str(err) and "last used" in str(err)
    assert "nothing was changed or deleted" in str(err)
    assert [c.method for c in world.issuer.console_calls] == ["GET"]
    assert set(world.at_adobe) == {world.original.uuid, other.uuid}
    assert world.stored() == ["the-original-secret-value"]


async def test_a_new_secret_that_never_works_is_deleted_with_the_old_token(world):
    world.issuer.new_secrets_work = False
    with pytest.raises(CycleError) as info:
        await world.cycle().run()
    assert info.value.outcome == "discarded"
    assert "did not work at IMS within rotate_verify (20s)" in str(info.value)
    assert "invalid_client" in str(info.value)  # the last answer is quoted
    assert world.at_adobe == {world.original.uuid: "the-original-secret-value"}
    assert world.stored() == ["the-original-secret-value"]
    delete = next(c for c in world.issuer.console_calls if c.method == "DELETE")
    assert delete.minted_by == world.original.uuid
    assert world.switched == []
    # It kept trying for rotate_verify, with backoff: 1+2+4+8 s of waiting, then gave up.
    tries = [r for r in world.issuer.received if r.form.get("scope") == "openid,AdobeID"]
    assert len(tries) == 5
    world.check_done()


async def test_a_new_secret_that_works_after_a_while_is_verified(world):
    world.issuer.activation_delay = 6.0  # e.g. IMS learns of it a few seconds late
    result = await world.cycle().run()
    assert result.outcome == "success"
    world.check_done()


@pytest.mark.parametrize("mode", ["post_lost", "post_garbage"])
async def test_a_post_without_a_usable_answer_leaves_nothing_behind(world, mode):
    world.issuer.console_mode = mode
    with pytest.raises(CycleError, match="Console API"):
        await world.cycle().run()
    world.issuer.console_mode = "ok"
    assert world.at_adobe == {world.original.uuid: "the-original-secret-value"}
    world.check_done()
    assert (await world.cycle().run()).outcome == "success"
    world.check_done()


@pytest.mark.parametrize("mode", ["error500", "unavailable"])
async def test_a_console_that_fails_changes_nothing(world, mode):
    world.issuer.console_mode = mode
    with pytest.raises(CycleError, match=r"GET answered HTTP 50\d.*x-request-id") as info:
        await world.cycle().run()
    assert info.value.outcome == "error" and info.value.status in (500, 503)
    assert world.at_adobe == {world.original.uuid: "the-original-secret-value"}
    assert world.stored() == ["the-original-secret-value"]


async def test_a_refused_post_quotes_the_console_and_changes_nothing(world):
    world.issuer.max_secrets = 1  # Adobe refuses a secret beyond its limit
    with pytest.raises(CycleError) as info:
        await world.cycle().run()
    text = str(info.value)
    assert "HTTP 400: 400012 maximum number of client secrets reached" in text
    assert "x-request-id" in text and info.value.request_id
    assert world.at_adobe == {world.original.uuid: "the-original-secret-value"}
    world.check_done()


async def test_without_the_management_api_the_error_says_so(world):
    world.issuer.mode = "invalid_scope"
    with pytest.raises(CycleError, match="I/O Management API added"):
        await world.cycle().run()
    assert world.issuer.console_calls == []


async def test_a_failed_delete_of_the_old_secret_is_retried(world):
    world.issuer.console_mode = "delete_error"
    with pytest.raises(CycleError, match="DELETE answered HTTP 500"):
        await world.cycle().run()
    assert world.state()["step"] == "switched"  # the new secret is in use already
    world.check_invariants()
    assert len(world.at_adobe) == 2
    world.issuer.console_mode = "ok"
    result = await world.cycle().run()
    assert result.outcome == "success"
    world.check_done()


async def test_a_manual_rotation_in_progress_is_not_touched(world):
    world.secret_file.with_name("adobe.secret.next").write_text("manual\n")
    with pytest.raises(CycleError, match="by hand is under way"):
        await world.cycle().run()
    assert world.issuer.console_calls == []


async def test_one_cycle_at_a_time(world):
    async with StateFile(world.state_dir, "adobe").locked():
        with pytest.raises(CycleError) as info:
            await world.cycle().run()
    assert info.value.outcome == "busy"


async def test_the_state_file_is_private(world):
    await world.cycle().run()
    path = world.state_dir / "cycling" / "adobe.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert (world.state_dir / "cycling").stat().st_mode & 0o777 == 0o700
    assert "secret-value" not in path.read_text()
    assert world.secret_file.read_text().strip() not in path.read_text()


#: Every step boundary of a cycle that succeeds, in order.
BOUNDARIES = ["adding", "posted", "stored", "added", "verified", "promoted", "switched", "deleted"]


@pytest.mark.parametrize("point", BOUNDARIES)
async def test_a_crash_at_any_step_boundary_is_finished_by_the_next_run(world, point, caplog):
    with pytest.raises(Crash):
        await world.cycle(crash_at=point).run()
    world.check_invariants()
    caplog.set_level(logging.INFO)
    result = await world.cycle().run()
    assert result.outcome == "success"
    world.check_done()
    # The secret the issuer holds is the one stored, and it works.
    assert world.secret_file.read_text().strip() == next(iter(world.at_adobe.values()))


@pytest.mark.parametrize("point", ["added", "discarding", "discard-deleted"])
async def test_a_crash_while_discarding_is_finished_by_the_next_run(world, point):
    world.issuer.new_secrets_work = False
    with pytest.raises((Crash, CycleError)):
        await world.cycle(crash_at=point).run()
    world.check_invariants()
    with pytest.raises(CycleError) as info:
        await world.cycle().run()
    assert info.value.outcome == "discarded"
    assert world.at_adobe == {world.original.uuid: "the-original-secret-value"}
    world.check_done()


async def test_a_malformed_list_changes_nothing(world, monkeypatch):
    async def garbage(self, method, url, token):  # type: ignore[no-untyped-def]
        from broker.upstream import HttpReply

        return HttpReply(200, httpx.Headers({"x-request-id": "r1"}), b'{"client_secrets": [{}]}')

    monkeypatch.setattr("broker.cycling.console.Console._call", garbage)
    with pytest.raises(CycleError, match="without a uuid.*x-request-id r1"):
        await world.cycle().run()
    assert world.stored() == ["the-original-secret-value"]


async def test_secrets_and_tokens_stay_out_of_errors_and_logs(world, caplog):
    caplog.set_level(logging.DEBUG)
    await world.cycle().run()
    world.issuer.new_secrets_work = False
    with pytest.raises(CycleError) as info:
        await world.cycle().run()
    text = caplog.text + str(info.value)
    values = [*world.at_adobe.values(), "the-original-secret-value", *world.issuer.minted]
    for value in values:
        assert value not in text


# -- the daemon's cycler -------------------------------------------------------------------


async def test_the_daemon_schedules_cycles_by_the_secrets_age(world):
    """No state: learn the secret's age first (a GET, nothing changed), then cycle when it
    is rotate_every old (+ at most 5% jitter); the daemon serves the new secret's token."""
    from broker.api import gauges, status_json

    manager, cycler, sched = await world.daemon(rand=0.5, rotate_every="30d")
    when, _ = sched.jobs["cycle:adobe"]
    assert when == world.clock() + 1.0  # soon: learn the age
    await sched.run("cycle:adobe")
    assert [c.method for c in world.issuer.console_calls] == ["GET"]  # a survey only
    created = world.original.created_at / 1000
    when, _ = sched.jobs["cycle:adobe"]
    assert when == created + 30 * 86400 + 0.5 * 3600  # jitter: 5%, at most an hour
    status = status_json(manager.get("adobe"), world.clock(), None, cycler)["secret_cycling"]
    assert status["secret_uuid"] == world.original.uuid and status["step"] is None
    assert status["secret_age_seconds"] == round(world.clock() - created)
    assert gauges(manager, world.clock(), cycler)[0].secret_age == world.clock() - created
    world.clock.now = when
    await sched.run("cycle:adobe")
    ((new_uuid, new_value),) = world.at_adobe.items()
    credential = manager.get("adobe")
    assert credential.secrets == (new_value,)
    assert world.issuer.minted[credential.token.access_token].secret_uuid == new_uuid
    assert manager.recorder.rotations[("adobe", "success")] == 1
    when, _ = sched.jobs["cycle:adobe"]
    assert when == world.clock() + 30 * 86400 + 0.5 * 3600
    await manager.close()


async def test_a_failed_cycle_backs_off_and_is_reported(world):
    world.issuer.add_client(CLIENT, "someone-elses-second-secret")
    manager, cycler, sched = await world.daemon(rotate_every="1d")
    await sched.run("cycle:adobe")  # the survey cannot tell which is ours: cycle → conflict
    status = cycler.status["adobe"]
    assert status.failures == 1 and status.last_error["outcome"] == "conflict"
    assert manager.recorder.rotations[("adobe", "conflict")] == 1
    when, _ = sched.jobs["cycle:adobe"]
    assert when == world.clock() + 3600  # a person must act: an hour, not seconds
    await manager.close()


def _table(world: World) -> dict[str, object]:
    return {
        "provider": "adobe", "client_id": CLIENT, "scopes": ["openid", "AdobeID"],
        "secret": f"file:{world.secret_file}", "ims_url": URL, "console_url": URL,
        "credential_id": CRED_ID, "console_org_id": ORG,
    }  # fmt: skip


# -- what a review found: the state and the Console are not trusted blindly -------------------


async def test_a_new_secret_removed_by_hand_mid_cycle_is_discarded_not_switched_to(world):
    """Crash after step 3, then the new secret is removed (`rotate --abort`, a hand):
    the next run must delete the new one at Adobe and keep the stored old one."""
    with pytest.raises(Crash):
        await world.cycle(crash_at="verified").run()
    world.secret_file.with_name("adobe.secret.next").unlink()
    with pytest.raises(CycleError) as info:
        await world.cycle().run()
    assert info.value.outcome == "discarded"
    assert world.at_adobe == {world.original.uuid: "the-original-secret-value"}
    world.check_done()


async def test_a_forged_state_file_never_deletes_the_stored_secret(world):
    state = world.state_dir / "cycling" / "adobe.json"
    state.parent.mkdir(parents=True, mode=0o700)
    forged = {"credential_id": CRED_ID, "step": "switched", "old": world.original.uuid,
              "new": "bogus", "new_digest": "0" * 64}  # fmt: skip
    state.write_text(json.dumps(forged))
    with pytest.raises(CycleError, match="neither the old nor the new"):
        await world.cycle().run()
    assert world.at_adobe == {world.original.uuid: "the-original-secret-value"}
    assert [c.method for c in world.issuer.console_calls if c.method == "DELETE"] == []


@pytest.mark.parametrize(
    "content",
    [
        {"credential_id": CRED_ID, "step": "switched", "old": "../../..", "new": "x"},
        {"credential_id": CRED_ID, "current_created_at": "soon"},
        {"credential_id": CRED_ID, "current_created_at": 1e300},
        {"credential_id": CRED_ID, "unknown": 1},
    ],
)
async def test_a_state_file_with_odd_values_is_refused_whole(world, content):
    state = world.state_dir / "cycling" / "adobe.json"
    state.parent.mkdir(parents=True, mode=0o700)
    state.write_text(json.dumps(content))
    with pytest.raises(CycleError, match="cannot be read"):
        await world.cycle().run()
    assert world.issuer.console_calls == []


async def test_the_state_file_is_not_followed_through_a_symlink(world, tmp_path):
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"credential_id": CRED_ID}))
    state = world.state_dir / "cycling" / "adobe.json"
    state.parent.mkdir(parents=True, mode=0o700)
    state.symlink_to(elsewhere)
    with pytest.raises(CycleError, match=f"{state} is a symbolic link.*: remove it"):
        await world.cycle().run()


@pytest.mark.parametrize("created", [None, "Infinity", "1e400", str(10**40), "2027-01-01T00:00"])
def test_unbelievable_times_are_unknown_not_fatal(created):
    from broker.cycling.console import _remote

    item = {"uuid": "a-b", "created_at": created, "secret_usages": [{"last_used_at": created}]}
    assert _remote(item) == _remote({"uuid": "a-b"})
    assert _remote(item).created_at is None


@pytest.mark.parametrize("uuid", ["..", "a/b", "x#y", "a%2fb", "", "a" * 101, 7, "a-b\n"])
def test_a_uuid_that_could_change_the_url_is_refused(world, uuid):
    from broker.cycling.console import _remote

    assert _remote({"uuid": uuid, "created_at": "1800000000000"}) is None


async def test_an_unknown_created_at_counts_from_now_and_does_not_cycle_at_once(world):
    """A Console that gives no believable created_at: the age starts now; the daemon
    does not cycle again and again for want of it."""
    world.original.created_at = 0  # the demo answers "0": not believable
    manager, cycler, sched = await world.daemon(rotate_every="1d")
    await sched.run("cycle:adobe")
    assert [c.method for c in world.issuer.console_calls] == ["GET"]
    when, _ = sched.jobs["cycle:adobe"]
    assert when == world.clock() + 86400
    await manager.close()


async def test_a_delete_that_does_not_take_keeps_the_cycle_open(world, monkeypatch):
    """The old secret is still listed after its DELETE (a 404, a lagging Console): the
    cycle stays at step 5 and finishes at the next run; it never reports success early."""
    from broker.cycling.console import Console

    async def not_found(self, token, uuid):  # type: ignore[no-untyped-def]
        return False

    with monkeypatch.context() as m:
        m.setattr(Console, "delete", not_found)
        with pytest.raises(CycleError, match="still listed after its DELETE"):
            await world.cycle().run()
    assert world.state()["step"] == "switched" and len(world.at_adobe) == 2
    assert (await world.cycle().run()).outcome == "success"
    world.check_done()


async def test_a_credential_removed_while_its_cycle_runs_is_no_error(world):
    manager, cycler, sched = await world.daemon(rotate_every="1d")
    world.issuer.hold = {"POST"}  # the cycle is caught mid-way: its new secret is asked for
    running = asyncio.create_task(cycler.rotate("adobe"))
    await asyncio.to_thread(wait_for, lambda: world.issuer.held == ["POST"])
    assert cycler.status["adobe"].running
    cycler.status.clear()  # what start() after a reload without it does, mid-cycle
    world.issuer.hold.clear()
    world.issuer.release()
    result = await running
    assert result.outcome == "success"
    await manager.close()


async def test_an_interrupted_cycle_resumes_without_rotate_every(world):
    with pytest.raises(Crash):
        await world.cycle(crash_at="switched").run()
    manager, cycler, sched = await world.daemon()
    await sched.run("cycle:adobe")
    world.check_done()
    assert "cycle:adobe" not in sched.jobs  # and no further cycle without rotate_every
    await manager.close()


async def test_in_a_fleet_a_broker_without_rotate_every_leaves_cycles_to_the_others(world):
    """With a state the fleet shares (Vault's), a broker without rotate_every neither
    resumes a cycle nor reads the lease: a reader's policy may not read it."""
    with pytest.raises(Crash):
        await world.cycle(crash_at="switched").run()
    loads: list[str] = []

    class Shared(StateFile):
        shared = True

        async def load(self, credential_id: str) -> CycleState:
            loads.append(credential_id)
            return await super().load(credential_id)

    states: States = lambda name, cred: Shared(world.state_dir, name)  # noqa: E731
    manager, cycler, sched = await world.daemon(states=states)
    assert loads == [] and "cycle:adobe" not in sched.jobs and cycler.status == {}
    assert world.state()["step"] == "switched"  # left to a broker with rotate_every
    await manager.close()
    manager, cycler, sched = await world.daemon(states=states, rotate_every="30d")
    assert loads and "cycle:adobe" in sched.jobs  # one that cycles resumes it
    await sched.run("cycle:adobe")
    world.check_done()
    await manager.close()


async def test_console_words_are_redacted_in_the_status(world):
    manager, cycler, sched = await world.daemon()
    manager.redactor.set("secret:adobe", ("the-original-secret-value",))
    cycler._failed("adobe", CycleError("error", "Console said: the-original-secret-value"))
    assert "the-original-secret-value" not in json.dumps(cycler.status["adobe"].last_error)
    await manager.close()


def test_a_rotation_by_hand_waits_for_a_cycle_to_finish(tmp_path, monkeypatch):
    """`rotate --finish/--abort` and a cycle both use NAME#next: never at the same time."""
    import fcntl

    from broker.cli import operations
    from broker.configedit import ConfigDocument
    from broker.cycling import CycleState
    from broker.errors import SecretError

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    adobe = {"provider": "adobe", "client_id": "c", "credential_id": CRED_ID, "console_org_id": ORG}
    cfg = config_file(tmp_path / "config.toml", {"adobe": adobe})
    state = StateFile(tmp_path / "xdg" / "token-broker", "adobe")
    asyncio.run(state.save(CycleState(credential_id=CRED_ID, step="added", old="a", new="b")))
    for step in (operations.rotate_abort, operations.rotate_finish):
        with pytest.raises(SecretError, match=r"a secret cycle is in progress \(step added\)"):
            step(ConfigDocument(cfg), "adobe")
    with open(state.lock_path) as held:  # the daemon's cycle holds the lock
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(SecretError, match="running already"):
            operations.rotate_abort(ConfigDocument(cfg), "adobe")


@pytest.mark.parametrize(
    ("url", "ok"),
    [("https://api.adobe.io", True), ("http://127.0.0.1:9", True), ("http://[::1]:9", True),
     ("http://localhost:9", True), ("http://api.adobe.io", False), ("http://10.1.2.3", False)],
)  # fmt: skip
def test_the_management_token_travels_over_https_only(url, ok):
    table = {"provider": "adobe", "client_id": "c", "console_url": url}
    if ok:
        settings({"a": table})
    else:
        with pytest.raises(ConfigError, match="console_url: expected an https:// URL"):
            settings({"a": table})


async def test_a_cycle_asked_for_during_the_survey_waits_for_it(world):
    """`rotate --auto` right after the daemon started meets the survey of step 1: it
    waits for it, it is not refused as busy (CI saw that race once)."""
    manager, cycler, sched = await world.daemon(rotate_every="1d")
    world.issuer.hold = {f"TOKEN:{world.original.uuid}"}  # the survey's management token
    survey = asyncio.create_task(sched.run("cycle:adobe"))
    await asyncio.to_thread(wait_for, lambda: world.issuer.held)
    # The survey holds the state file's lock now, until its token is released.
    world.issuer.hold.clear()
    rotating = asyncio.create_task(cycler.rotate("adobe"))
    await asyncio.to_thread(
        wait_for, lambda: cycler.status["adobe"].running or rotating.done(), what="the cycle"
    )
    assert not survey.done()  # the cycle asked for meets the survey still running
    world.issuer.release()
    result = await rotating
    await survey
    assert result.outcome == "success"
    world.check_done()
    await manager.close()


async def test_a_secret_the_daemon_cannot_write_is_a_reported_cycle_error(world, monkeypatch):
    """rotate --auto on a credential without rotate_every whose secret is an env: one: the
    cycle fails before it starts, and says so in the status like any failed cycle."""
    monkeypatch.setenv("TB_CYCLE_TEST_SECRET", "the-original-secret-value")
    manager, cycler, _ = await world.daemon(secret="env:TB_CYCLE_TEST_SECRET")
    with pytest.raises(CycleError, match="secret cycling cannot use env:") as info:
        await cycler.rotate("adobe")
    assert info.value.outcome == "error"
    assert "environment variable" in cycler.status["adobe"].last_error["detail"]
    assert manager.recorder.rotations[("adobe", "error")] == 1
    assert world.issuer.console_calls == []
    await manager.close()


# -- issue 18: whose state, and who may ask for a cycle -------------------------------------


def _forged(world: World) -> dict[str, dict[str, object]]:
    """State files that name the broker's own secret as something to delete, without the
    digest that only the broker could write."""
    mine = world.original.uuid
    return {
        "the two fields of the report": {"credential_id": CRED_ID, "step": "adding"},
        "adding, a made-up old secret": {
            "credential_id": CRED_ID, "step": "adding", "old": "made-up", "before": ["made-up"],
            "old_digest": "0" * 64, "started_at": world.clock(),
        },
        "discarding ours": {"credential_id": CRED_ID, "step": "discarding", "new": mine},
        "discarding ours, digests made up": {
            "credential_id": CRED_ID, "step": "discarding", "old": "made-up", "new": mine,
            "old_digest": "0" * 64, "new_digest": "1" * 64,
        },
        "added, ours as the new one": {"credential_id": CRED_ID, "step": "added", "new": mine,
                                       "new_digest": "1" * 64},
        "verified, ours as the new one": {"credential_id": CRED_ID, "step": "verified",
                                          "new": mine, "old": "made-up"},
    }  # fmt: skip


FORGED = ["the two fields of the report", "adding, a made-up old secret", "discarding ours",
          "discarding ours, digests made up", "added, ours as the new one",
          "verified, ours as the new one"]  # fmt: skip


@pytest.mark.parametrize("case", FORGED)
async def test_a_state_that_does_not_prove_an_orphan_deletes_nothing(world, case):
    """A two-field state file made the daemon delete its only working secret as the
    "orphan of a lost POST"; no state but the broker's own (the digest of the secret it
    stores) may decide a deletion."""
    state = world.state_dir / "cycling" / "adobe.json"
    state.parent.mkdir(parents=True, mode=0o700)
    state.write_text(json.dumps(_forged(world)[case]))
    state.chmod(0o600)
    with pytest.raises(CycleError) as info:
        await world.cycle().run()
    text = str(info.value)
    assert "nothing was deleted or changed" in text and f"then remove {state}" in text
    assert world.at_adobe == {world.original.uuid: "the-original-secret-value"}
    assert [c.method for c in world.issuer.console_calls if c.method != "GET"] == []
    assert world.stored() == ["the-original-secret-value"]
    assert json.loads(state.read_text()) == _forged(world)[case]  # left for a person to judge


async def test_a_lost_post_is_still_recovered_from_the_brokers_own_state(world):
    """The proof does not stop the recovery it is for: a POST whose answer was lost."""
    with pytest.raises(Crash):
        await world.cycle(crash_at="posted").run()
    assert len(world.at_adobe) == 2 and world.state()["step"] == "adding"
    assert (await world.cycle().run()).outcome == "success"
    world.check_done()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make another user's directory")
async def test_a_state_directory_another_user_made_is_not_used(world):
    """The state directory pre-created by another user (0777), a state file planted in it:
    the cycle refuses the directory with a sentence that names it and the fix."""
    import pwd

    nobody = pwd.getpwnam("nobody").pw_uid
    (world.state_dir / "cycling").mkdir(parents=True)
    for path in (world.state_dir, world.state_dir / "cycling"):
        os.chown(path, nobody, nobody)
        path.chmod(0o777)
    with pytest.raises(CycleError) as info:
        await world.cycle().run()
    assert f"{world.state_dir} is owned by uid {nobody}, not by this user" in str(info.value)
    assert world.issuer.console_calls == []
    os.chown(world.state_dir, 0, 0)
    with pytest.raises(CycleError, match=rf"{world.state_dir} is writable by group or others "
                                         r"\(mode 0777\).*chmod go-w"):  # fmt: skip
        await world.cycle().run()
    world.state_dir.chmod(0o700)
    with pytest.raises(CycleError, match=f"{world.state_dir / 'cycling'} is owned by uid"):
        await StateFile(world.state_dir, "adobe").load(CRED_ID)
    assert world.issuer.console_calls == []


async def test_a_planted_lock_symlink_is_not_followed(world, tmp_path):
    lock = world.state_dir / "cycling" / "adobe.lock"
    lock.parent.mkdir(parents=True, mode=0o700)
    target = tmp_path / "created-by-root"
    lock.symlink_to(target)
    with pytest.raises(CycleError, match=f"{lock} is a symbolic link"):
        await world.cycle().run()
    assert not target.exists() and world.issuer.console_calls == []


async def test_a_cycle_asked_for_within_the_cooldown_is_refused(world):
    """Three back-to-back requests ran three whole cycles: now the second is a 429 that
    says when the last one ran and when one may be asked for again."""
    from broker.cycling import ROTATE_COOLDOWN
    from broker.errors import RotateCooldown

    manager, cycler, sched = await world.daemon(rotate_every="5m")
    assert (await cycler.rotate("adobe")).outcome == "success"
    ended = world.clock()
    world.clock.now += 60
    posts = len([c for c in world.issuer.console_calls if c.method == "POST"])
    with pytest.raises(RotateCooldown) as info:
        await cycler.rotate("adobe")
    assert info.value.retry_after == ROTATE_COOLDOWN - 60
    status, body, headers = (
        info.value.http_status,
        info.value.http_body(),
        info.value.http_headers(),
    )
    assert (status, body["error"], headers["Retry-After"]) == (429, "rotate_cooldown", "540")
    from broker.tokens import rfc3339

    assert f"the last secret cycle ran at {rfc3339(ended)}" in body["detail"]
    assert f"asked for from {rfc3339(ended + ROTATE_COOLDOWN)}" in body["detail"]
    assert len([c for c in world.issuer.console_calls if c.method == "POST"]) == posts
    assert not cycler.status["adobe"].running and cycler.status["adobe"].failures == 0
    # The schedule (rotate_every) is not held to it: the daemon cycles when it is due.
    world.clock.now = sched.jobs["cycle:adobe"][0]
    assert world.clock.now < ended + ROTATE_COOLDOWN
    await sched.run("cycle:adobe")
    assert manager.recorder.rotations[("adobe", "success")] == 2
    world.clock.now += ROTATE_COOLDOWN
    assert (await cycler.rotate("adobe")).outcome == "success"
    await manager.close()


async def test_a_cycle_that_was_undone_counts_for_the_cooldown(world):
    from broker.errors import RotateCooldown

    world.issuer.new_secrets_work = False
    manager, cycler, _ = await world.daemon()
    with pytest.raises(CycleError, match="did not work at IMS"):
        await cycler.rotate("adobe")
    world.issuer.new_secrets_work = True
    with pytest.raises(RotateCooldown):
        await cycler.rotate("adobe")
    await manager.close()


async def test_a_switch_undone_while_the_brokers_were_awaited_deletes_the_new_not_the_old(
    world, monkeypatch
):
    """Between the switch and the DELETE, the wait for every broker may last rotate_grace;
    an operator who switches the store back meanwhile (a rollback) must not lose the old
    secret: the store is read again after the wait, and the new secret is the one that goes."""

    async def rolled_back(self: StateFile) -> None:
        world.secret_file.write_text("the-original-secret-value\n")

    monkeypatch.setattr(StateFile, "adopted", rolled_back)
    with pytest.raises(CycleError) as info:
        await world.cycle().run()
    assert info.value.outcome == "discarded" and "undone by hand" in str(info.value)
    assert world.at_adobe == {world.original.uuid: "the-original-secret-value"}
    world.check_done()
