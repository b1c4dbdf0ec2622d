from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from other_user import run_python_as

from broker import stores
from broker.errors import SecretError
from broker.stores import keyring as keyring_store
from broker.stores.file import FileWriter


async def resolve(text: str, name: str) -> tuple[str, ...]:
    return await stores.parse(text, name).read(name)


async def test_file_secret_strips_one_trailing_newline(tmp_path):
    f = tmp_path / "s"
    f.write_text("abc\n\n")
    assert await resolve(f"file:{f}", "a") == ("abc\n",)
    f.write_text("abc\r\n")
    assert await resolve(f"file:{f}", "a") == ("abc",)
    f.write_text("  spaced  ")
    assert await resolve(f"file:{f}", "a") == ("  spaced  ",)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_text("\n"), "is empty"),
        (lambda p: p.mkdir(), "cannot read"),
        (lambda p: p.write_bytes(b"\xff\xfe"), "not UTF-8"),
    ],
)
async def test_file_secret_errors_name_credential_and_file(tmp_path, setup, message):
    f = tmp_path / "s"
    setup(f)
    with pytest.raises(SecretError) as info:
        await resolve(f"file:{f}", "adobe")
    assert "credential 'adobe'" in str(info.value)
    assert str(f) in str(info.value) and message in str(info.value)


async def test_systemd_credentials_directory(tmp_path, monkeypatch):
    (tmp_path / "adobe").write_text("from-systemd")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert await resolve("systemd:adobe", "a") == ("from-systemd",)
    with pytest.raises(SecretError, match="systemd credential 'other' does not exist"):
        await resolve("systemd:other", "a")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(SecretError, match="LoadCredential="):
        await resolve("systemd:adobe", "a")


async def test_env_secret(monkeypatch):
    monkeypatch.setenv("TB_TEST_SECRET", "from-env")
    assert await resolve("env:TB_TEST_SECRET", "a") == ("from-env",)
    with pytest.raises(SecretError, match="TB_TEST_MISSING is not set"):
        await resolve("env:TB_TEST_MISSING", "a")


async def test_keyring_fail_backend_says_what_to_do(monkeypatch):
    # keyring's own "fail" backend is what a headless host without a Secret Service gets;
    # the daemon reads the keyring in a child process, which inherits this choice.
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyring.backends.fail.Keyring")
    with pytest.raises(SecretError) as info:
        await resolve("keyring", "adobe")
    text = str(info.value)
    assert "credential 'adobe'" in text
    assert "no keyring backend is available" in text and "keyring.backends.fail" in text
    assert "systemd: or file:" in text


class Memory:
    """A keyring backend stand-in for the in-process reader (unit level only)."""

    def __init__(self, items):
        self.items = items

    def get_password(self, service, username):
        if service == "locked":
            from keyring.errors import KeyringLocked

            raise KeyringLocked("Failed to unlock the collection!")
        return self.items.get((service, username))


def test_read_keyring_current_next_and_errors(monkeypatch):
    backend = Memory(
        {
            ("token-broker", "adobe"): "old",
            ("token-broker", "adobe#next"): "new",
            ("svc", "user"): "explicit",
        }
    )
    monkeypatch.setattr(keyring_store, "backend", lambda name: backend)
    assert keyring_store.read("token-broker", "adobe", "adobe") == ("new", "old")
    assert keyring_store.read("svc", "user", "x") == ("explicit",)
    with pytest.raises(SecretError, match="no keyring item service='token-broker' username='b'"):
        keyring_store.read("token-broker", "b", "b")
    with pytest.raises(SecretError, match="the collection is locked.*start a Secret Service"):
        keyring_store.read("locked", "x", "b")


def test_keyring_item_of_references():
    ref = stores.parse("keyring", "adobe")
    assert (ref.service, ref.user) == ("token-broker", "adobe")
    ref = stores.parse("keyring:svc/a/b", "adobe")
    assert (ref.service, ref.user) == ("svc", "a/b")


def test_keyring_child_gets_no_stray_environment(monkeypatch):
    monkeypatch.setenv("PARTNER_SECRET", "do-not-pass-me")
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", "unix:path=/x")
    env = keyring_store.child_environment()
    assert "PARTNER_SECRET" not in env and "do-not-pass-me" not in env.values()
    assert env["DBUS_SESSION_BUS_ADDRESS"] == "unix:path=/x"


def test_describe():
    assert stores.parse("keyring", "adobe").describe() == (
        "keyring item service='token-broker' username='adobe'"
    )
    assert stores.parse("file:/x", "a").describe() == "file /x"


# -- writing secrets (secret cycling) ------------------------------------------------------


async def test_file_store_cycle_keeps_mode_and_owner_and_is_idempotent(tmp_path):
    current = tmp_path / "adobe.secret"
    current.write_text("old\n")
    current.chmod(0o640)
    os.chown(current, -1, 0)
    ref = stores.parse(f"file:{current}", "adobe")
    store = ref.writer("adobe")
    assert isinstance(store, FileWriter)
    assert (await store.current(), await store.upcoming()) == ("old", None)
    await store.put_upcoming("new")
    upcoming = stores.next_file(current)
    assert upcoming == tmp_path / "adobe.secret.next"
    assert stat.S_IMODE(upcoming.stat().st_mode) == 0o640  # the current file's mode
    # The daemon reads both while a cycle runs: the new one first, the old as fallback.
    assert await ref.read("adobe") == ("new", "old")
    await store.promote()
    assert current.read_text() == "new\n" and not upcoming.exists()
    st = current.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, os.getuid(), 0)
    await store.promote()  # a step repeated after a crash changes nothing
    await store.drop_upcoming()
    assert await ref.read("adobe") == ("new",)


async def test_file_store_drop_upcoming_keeps_the_current_secret(tmp_path):
    current = tmp_path / "s"
    current.write_text("old")
    store = stores.parse(f"file:{current}", "a").writer("a")
    await store.put_upcoming("new")
    await store.drop_upcoming()
    assert await store.upcoming() is None and current.read_text() == "old"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("systemd:adobe", "systemd credential is a read-only copy"),
        ("env:ADOBE_SECRET", "environment variable (ADOBE_SECRET)"),
    ],
)
def test_unwritable_references_say_why_and_what_to_use(text, says):
    ref = stores.parse(text, "a")
    assert says in (ref.unwritable() or "")
    with pytest.raises(SecretError, match='use secret = "keyring"'):
        ref.writer("a")


def _unwritable_as(uid: int, path: Path) -> str:
    """SecretRef.unwritable() of ``file:path`` as seen by the process ``uid``."""
    code = f"from broker.stores import parse; print(parse('file:{path}', 'a').unwritable())"
    try:  # root checks as another user, as a system service would run
        out = run_python_as(uid, uid, code)
    except LookupError as exc:  # no interpreter that user can start (say, pyenv under /root)
        if os.environ.get("CI") == "true":
            pytest.fail(f"{exc} (CI must run this test)")
        pytest.skip(str(exc))
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_a_read_only_secret_file_or_directory_is_unwritable():
    user = os.getuid() if os.geteuid() != 0 else 65534  # nobody
    with tempfile.TemporaryDirectory() as top:
        os.chmod(top, 0o755)  # reachable by that user
        directory = Path(top) / "d"
        directory.mkdir()
        f = directory / "s"
        f.write_text("x")
        f.chmod(0o444)
        os.chown(directory, user, -1)
        assert "is read-only to this process" in _unwritable_as(user, f)
        os.chown(directory, 0 if os.geteuid() == 0 else user, -1)
        directory.chmod(0o555)
        try:
            assert "is not writable by this process" in _unwritable_as(user, f)
        finally:
            directory.chmod(0o755)
        f.chmod(0o600)
        os.chown(f, user, -1)
        directory.chmod(0o777)
        assert _unwritable_as(user, f) == "None"


def test_a_read_only_mount_is_unwritable(tmp_path):
    """What root meets: a read-only file system (a mounted Kubernetes Secret, ReadOnlyPaths=)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to bind-mount read-only")
    directory = tmp_path / "ro"
    directory.mkdir()
    (directory / "s").write_text("x")
    ns = subprocess.run(["unshare", "-m", "sh", "-c",
        f"mount --bind {directory} {directory} && mount -o remount,bind,ro {directory} && "
        f"{sys.executable} -c 'from broker.stores import parse; "
        f"print(parse(\"file:{directory}/s\", \"a\").unwritable())'"],
        capture_output=True, text=True, check=False)  # fmt: skip
    assert ns.returncode == 0, ns.stderr
    assert "is not writable by this process" in ns.stdout
