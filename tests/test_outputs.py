"""File outputs, one module at a time: config checks, formats, the atomic write, the runner."""

from __future__ import annotations

import asyncio
import grp
import json
import logging
import os
import stat
import sys
from pathlib import Path

import helpers
import pytest
from helpers import FakeClock, wait_for

from broker import config
from broker.errors import ConfigError
from broker.metrics import Recorder
from broker.outputs import Outputs, render, write_file
from broker.tokens import Token

NOW = 1_800_000_000.0
TOKEN = Token("tok-abcdef0123456789", "bearer", issued_at=NOW - 60, expires_at=NOW + 3540)


def settings(tmp_path: Path, *outputs: dict, headers: dict | None = None) -> config.Settings:  # type: ignore[type-arg]
    adobe = {"provider": "adobe", "client_id": "cid", "org_id": "ORG@AdobeOrg", "secret": "env:X"}
    return helpers.settings({"adobe": {**adobe, "headers": headers or {}}}, outputs=list(outputs))


def error_of(tmp_path: Path, output: dict) -> str:  # type: ignore[type-arg]
    with pytest.raises(ConfigError) as info:
        settings(tmp_path, output)
    return str(info.value)


def test_outputs_are_validated_naming_the_key(tmp_path):
    ok = {"credential": "adobe", "path": str(tmp_path / "t")}
    assert "[[outputs]] #1 credential: no credential named 'nope'" in error_of(
        tmp_path, {**ok, "credential": "nope"}
    )
    assert "[[outputs]] #1 path: expected an absolute file path" in error_of(
        tmp_path, {**ok, "path": "relative/t"}
    )
    assert f"[[outputs]] #1 path: the directory {tmp_path}/missing does not exist" in error_of(
        tmp_path, {**ok, "path": str(tmp_path / "missing" / "t")}
    )
    assert "[[outputs]] #1 format: expected 'token', 'json', 'headers' or 'env'" in error_of(
        tmp_path, {**ok, "format": "yaml"}
    )
    assert '[[outputs]] #1 mode: expected permission bits such as "0600"' in error_of(
        tmp_path, {**ok, "mode": "0666"}
    )
    assert "[[outputs]] #1 group: no group named 'no-such-group-x'" in error_of(
        tmp_path, {**ok, "group": "no-such-group-x"}
    )
    assert "[[outputs]] #1 command: expected a non-empty list" in error_of(
        tmp_path, {**ok, "command": []}
    )
    with pytest.raises(ConfigError, match="is written by two outputs"):
        settings(tmp_path, ok, ok)
    out = settings(tmp_path, {**ok, "mode": "0640", "command": ["true"]}).outputs[0]
    assert (out.mode, out.format, out.command, out.index) == (0o640, "token", ("true",), 1)


@pytest.mark.parametrize(
    "name, why",
    [
        ("Authorization", "set by the broker"),
        ("x-api-key", "set by the broker"),
        ("Connection", "set by the broker or per connection"),
        ("Transfer-Encoding", "set by the broker or per connection"),
        ("bad name", "not a valid header name"),
    ],
)
def test_static_headers_are_validated(tmp_path, name, why):
    with pytest.raises(ConfigError, match=why):
        settings(tmp_path, headers={name: "x"})
    with pytest.raises(ConfigError, match="printable"):
        settings(tmp_path, headers={"x-sandbox-name": "a\r\nInjected: 1"})


def test_each_format(tmp_path):
    s = settings(tmp_path, headers={"x-sandbox-name": "prod"})
    cred = s.credentials["adobe"]

    def out(fmt: str) -> str:
        o = helpers.settings(
            {"adobe": {"provider": "adobe", "client_id": "c", "secret": "env:X"}},
            outputs=[{"credential": "adobe", "path": str(tmp_path / fmt), "format": fmt}],
        ).outputs[0]
        return render(o, cred, TOKEN, NOW).decode()

    assert out("token") == "tok-abcdef0123456789\n"
    assert json.loads(out("json")) == {
        "access_token": "tok-abcdef0123456789", "token_type": "bearer", "expires_in": 3540,
        "expires_at": "2027-01-15T08:59:00Z",
    }  # fmt: skip
    assert json.loads(out("headers")) == {
        "Authorization": "Bearer tok-abcdef0123456789", "x-api-key": "cid",
        "x-gw-ims-org-id": "ORG@AdobeOrg", "x-sandbox-name": "prod",
    }  # fmt: skip
    assert out("env").splitlines() == [
        "TOKEN_BROKER_ACCESS_TOKEN=tok-abcdef0123456789",
        "TOKEN_BROKER_EXPIRES_AT=2027-01-15T08:59:00Z",
        "TOKEN_BROKER_API_KEY=cid",
        "TOKEN_BROKER_ORG_ID=ORG@AdobeOrg",
        "TOKEN_BROKER_HEADER_X_SANDBOX_NAME=prod",
    ]


def test_the_write_is_atomic_with_the_mode_and_group_from_the_first_byte(tmp_path, monkeypatch):
    group = grp.getgrgid(os.getgid()).gr_name
    target = tmp_path / "t"
    target.write_text("old\n")
    seen: list[int] = []
    real_write = os.write

    def spy_write(fd: int, data: bytes) -> int:  # the mode the moment bytes go in
        seen.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spy_write)
    write_file(target, b"new\n", 0o640, group)
    assert seen and set(seen) == {0o640}
    assert target.read_text() == "new\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert target.stat().st_gid == os.getgid()
    assert [p.name for p in tmp_path.iterdir()] == ["t"]  # no temporary file left behind


async def test_writes_of_one_output_never_overlap_and_only_the_newest_waits(tmp_path):
    import threading

    s = settings(tmp_path, {"credential": "adobe", "path": str(tmp_path / "t")})
    entered, release = threading.Event(), threading.Event()
    written: list[bytes] = []

    def slow_writer(path: Path, content: bytes, mode: int, group: str | None) -> None:
        entered.set()
        assert release.wait(10)
        written.append(content)

    class Cred:
        settings = s.credentials["adobe"]
        token = TOKEN
        serve_until = NOW + 3000

    clock = FakeClock(NOW)
    outputs = Outputs(s.outputs, recorder=Recorder(), clock=clock, writer=slow_writer)
    outputs.refreshed(Cred())  # type: ignore[arg-type]
    assert await asyncio.to_thread(entered.wait, 10)  # the first write is under way
    for i in range(5):  # five more tokens meanwhile: one more write, the newest
        Cred.token = Token(f"tok-{i}-0123456789", "bearer", NOW, NOW + 3600)
        outputs.refreshed(Cred())  # type: ignore[arg-type]
    release.set()
    await outputs.close()
    assert written == [b"tok-abcdef0123456789\n", b"tok-4-0123456789\n"]


async def test_a_command_runs_without_the_brokers_environment_and_is_bounded(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("PARTNER_SECRET", "do-not-pass-me")
    probe = tmp_path / "probe.py"
    probe.write_text("import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))\n")
    env_file = tmp_path / "env.json"
    s = settings(
        tmp_path,
        {"credential": "adobe", "path": str(tmp_path / "t"),
         "command": [sys.executable, str(probe), str(env_file)]},
        {"credential": "adobe", "path": str(tmp_path / "u"), "command": ["false"]},
        {"credential": "adobe", "path": str(tmp_path / "v"), "command": ["/no/such/program"]},
    )  # fmt: skip

    class Cred:
        settings = s.credentials["adobe"]
        token = TOKEN
        serve_until = NOW + 3000

    recorder = Recorder()
    outputs = Outputs(s.outputs, recorder=recorder, clock=FakeClock(NOW))

    def all_ran() -> bool:
        return sum(n for (_, kind, _), n in recorder.outputs.items() if kind == "command") == 3

    with caplog.at_level(logging.INFO):
        outputs.refreshed(Cred())  # type: ignore[arg-type]
        await asyncio.to_thread(wait_for, all_ran, what="the three commands")
        await outputs.close()  # at shutdown a command not yet started is not started
    env = json.loads(env_file.read_text())
    assert "PARTNER_SECRET" not in env and "do-not-pass-me" not in env.values()
    assert env["TOKEN_BROKER_OUTPUT"] == str(tmp_path / "t")
    assert TOKEN.access_token not in json.dumps(env)  # the token only in the file
    assert recorder.outputs[(str(tmp_path / "t"), "command", "ok")] == 1
    assert recorder.outputs[(str(tmp_path / "u"), "command", "error")] == 1
    assert recorder.outputs[(str(tmp_path / "v"), "command", "error")] == 1
    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 2  # once per failure
    assert any("exit status 1" in m for m in failures)
    assert any("cannot run /no/such/program" in m for m in failures)
    assert TOKEN.access_token not in caplog.text


async def test_a_failed_write_is_counted_and_logged_and_serving_goes_on(tmp_path, caplog):
    s = settings(tmp_path, {"credential": "adobe", "path": str(tmp_path / "t")})

    def broken(path: Path, content: bytes, mode: int, group: str | None) -> None:
        raise PermissionError(13, "Permission denied")

    class Cred:
        settings = s.credentials["adobe"]
        token = TOKEN
        serve_until = NOW + 3000

    recorder = Recorder()
    outputs = Outputs(s.outputs, recorder=recorder, clock=FakeClock(NOW), writer=broken)
    outputs.refreshed(Cred())  # type: ignore[arg-type]
    await outputs.close()
    assert recorder.outputs[(str(tmp_path / "t"), "write", "error")] == 1
    assert "not written: Permission denied; tried again at the next refresh" in caplog.text


def test_an_env_output_refuses_static_values_that_readers_would_read_differently(tmp_path):
    env = {"credential": "adobe", "path": str(tmp_path / "t.env"), "format": "env"}
    with pytest.raises(ConfigError) as info:
        settings(tmp_path, env, headers={"x-note": "two words"})
    assert str(info.value) == (
        "<config>: [[outputs]] #1 format env: TOKEN_BROKER_HEADER_X_NOTE holds a space, which "
        "sh, systemd's EnvironmentFile= and Docker's --env-file would each read differently "
        "(an env file carries only letters, digits and -._~+/=:@%, unquoted); use the json or "
        "headers format for it"
    )
    with pytest.raises(ConfigError, match="TOKEN_BROKER_HEADER_X_Q holds '\"'"):
        settings(tmp_path, env, headers={"x-q": 'say"hi'})
    # The same header in the other formats, and plain values in env, are fine.
    settings(tmp_path, {**env, "format": "headers"}, headers={"x-note": "two words"})
    settings(tmp_path, env, headers={"x-sandbox-name": "prod-1"})


async def test_a_token_an_env_file_cannot_carry_is_not_written_and_not_logged(tmp_path, caplog):
    s = settings(tmp_path, {"credential": "adobe", "path": str(tmp_path / "t.env"),
                            "format": "env"})  # fmt: skip

    class Cred:
        settings = s.credentials["adobe"]
        token = Token("~root-0123456789abcdef", "bearer", NOW - 60, NOW + 3540)  # b64token
        serve_until = NOW + 3000

    recorder = Recorder()
    outputs = Outputs(s.outputs, recorder=recorder, clock=FakeClock(NOW))
    outputs.refreshed(Cred())  # type: ignore[arg-type]
    await outputs.close()
    assert not (tmp_path / "t.env").exists()
    assert recorder.outputs[(str(tmp_path / "t.env"), "write", "error")] == 1
    assert "TOKEN_BROKER_ACCESS_TOKEN holds a '~' where sh expands it" in caplog.text
    assert Cred.token.access_token not in caplog.text


def group_members(group: int) -> list[int]:
    """Live (not zombie) processes whose process group is ``group``, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[2]) == group and fields[0] != "Z":
            found.append(int(entry))
    return found


async def started_group(group_file: Path) -> int:
    """The process group the command wrote into ``group_file``, once it has."""

    def written() -> str:
        return group_file.read_text().strip() if group_file.exists() else ""

    return int(await asyncio.to_thread(wait_for, written, what="the command to start"))


async def ended(outputs: Outputs, group_file: Path) -> None:
    """Cleanup whatever a failed test left: the outputs' tasks, the command's group."""
    kill_recorded_group(group_file)
    await asyncio.wait_for(outputs.close(), 10)


def kill_recorded_group(group_file: Path) -> None:
    import signal

    if group_file.exists() and group_file.read_text().strip():
        try:
            os.killpg(int(group_file.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


def lingering(tmp_path: Path, command: str | None = None) -> tuple[config.Settings, Path]:
    """Settings with one output whose command records its process group and then waits
    on a child, as ``sh -c 'sleep 300; :'`` does (``:`` keeps sh from becoming sleep)."""
    group_file = tmp_path / "t.group"
    script = f'echo $$ > "{group_file}"; ' + (command or "sleep 300; :")
    table = {"credential": "adobe", "path": str(tmp_path / "t"), "command": ["sh", "-c", script]}
    return settings(tmp_path, table), group_file


def cred_of(s: config.Settings) -> object:
    class Cred:
        settings = s.credentials["adobe"]
        token = TOKEN
        serve_until = NOW + 3000

    return Cred()


async def test_a_command_that_overstays_is_ended_with_its_whole_process_group(tmp_path, caplog):
    s, group_file = lingering(tmp_path)
    recorder = Recorder()
    outputs = Outputs(s.outputs, recorder=recorder, clock=FakeClock(NOW),
                      command_timeout=0.5, command_grace=0.5)  # fmt: skip
    try:
        outputs.refreshed(cred_of(s))  # type: ignore[arg-type]
        group = await started_group(group_file)
        # The timeout ends the command: its sleep must not outlive it.
        await asyncio.to_thread(
            wait_for, lambda: recorder.outputs.get((str(tmp_path / "t"), "command", "error")),
            what="the command to time out",
        )  # fmt: skip
        await asyncio.to_thread(
            wait_for, lambda: not group_members(group), what="the command's children to end"
        )
        assert "ended after 0.5s, with its process group" in caplog.text
    finally:
        await ended(outputs, group_file)


@pytest.mark.parametrize(
    "command, grace",
    [(None, 0.5), ("sh -c 'trap \"\" TERM; sleep 300; :'", 0.2)],
    ids=["ends-at-once", "sigkill-after-the-grace-when-sigterm-is-ignored"],
)
async def test_stopping_ends_running_commands_with_their_groups(tmp_path, caplog, command, grace):
    s, group_file = lingering(tmp_path, command)
    outputs = Outputs(s.outputs, recorder=Recorder(), clock=FakeClock(NOW), command_grace=grace)
    try:
        outputs.refreshed(cred_of(s))  # type: ignore[arg-type]
        group = await started_group(group_file)
        # Before, close() waited for the command's 30 s; a stopping daemon cannot.
        await asyncio.wait_for(outputs.close(), 10)
        await asyncio.to_thread(wait_for, lambda: not group_members(group), what="the group")
        assert "ended with its process group: the broker stopped" in caplog.text
    finally:
        await ended(outputs, group_file)
