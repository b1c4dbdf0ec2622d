from __future__ import annotations

import pytest

from broker import secrets
from broker.errors import SecretError


async def resolve(text: str, name: str) -> tuple[str, ...]:
    return await secrets.resolve(secrets.SecretRef.parse(text, name), name)


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
    monkeypatch.setattr(secrets, "keyring_backend", lambda name: backend)
    assert secrets.read_keyring("token-broker", "adobe", "adobe") == ("new", "old")
    assert secrets.read_keyring("svc", "user", "x") == ("explicit",)
    with pytest.raises(SecretError, match="no keyring item service='token-broker' username='b'"):
        secrets.read_keyring("token-broker", "b", "b")
    with pytest.raises(SecretError, match="the collection is locked.*start a Secret Service"):
        secrets.read_keyring("locked", "x", "b")


def test_keyring_item_of_references():
    ref = secrets.SecretRef.parse("keyring", "adobe")
    assert (ref.service, ref.user) == ("token-broker", "adobe")
    ref = secrets.SecretRef.parse("keyring:svc/a/b", "adobe")
    assert (ref.service, ref.user) == ("svc", "a/b")


def test_keyring_child_gets_no_stray_environment(monkeypatch):
    monkeypatch.setenv("PARTNER_SECRET", "do-not-pass-me")
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", "unix:path=/x")
    env = secrets.child_environment()
    assert "PARTNER_SECRET" not in env and "do-not-pass-me" not in env.values()
    assert env["DBUS_SESSION_BUS_ADDRESS"] == "unix:path=/x"


def test_describe():
    assert secrets.SecretRef.parse("keyring", "adobe").describe() == (
        "keyring item service='token-broker' username='adobe'"
    )
    assert secrets.SecretRef.parse("file:/x", "a").describe() == "file /x"
