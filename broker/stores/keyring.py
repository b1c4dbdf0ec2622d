"""``keyring`` and ``keyring:SERVICE/USERNAME``: the OS keyring (Secret Service, Keychain...).

The daemon reads and writes keyring items in a child process
(``python -m broker.stores.keyring_child``), so the event loop never blocks on
D-Bus, a call stuck on a locked collection can be killed, and the daemon never
imports keyring (its Secret Service backend costs ~9 MB resident for a secret
read once). Short-lived commands call the backend in-process through the
blocking functions below, which the child uses too.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from asyncio.subprocess import PIPE
from dataclasses import dataclass
from typing import Any

from broker.errors import SecretError
from broker.stores.base import NO_CONTEXT, Context, SecretRef, SecretWriter, Stored, register

SERVICE = "token-broker"
#: Suffix of the item that holds the new secret during a rotation or a cycle. '#' is
#: outside the credential-name alphabet, so it cannot collide with another credential.
NEXT_SUFFIX = "#next"
WAY_OUT = "start a Secret Service (e.g. gnome-keyring) or use a systemd: or file: secret"
TIMEOUT = 20.0
#: What a keyring child process inherits: what keyring and D-Bus need, nothing else,
#: so that an ``env:`` secret of another credential never reaches it.
_CHILD_ENV_PREFIXES = ("DBUS_", "XDG_", "PYTHON", "KEYRING_", "LC_", "GNOME_KEYRING_")
_CHILD_ENV_NAMES = {"HOME", "PATH", "LANG", "USER", "LOGNAME", "VIRTUAL_ENV", "TMPDIR"}


class KeyringWriter(SecretWriter):
    """Items ``USER`` and ``USER#next``, written by the keyring child process."""

    ref: KeyringRef

    async def _op(self, op: str, upcoming: bool, **extra: str) -> dict[str, Any]:
        user = self.ref.user + (NEXT_SUFFIX if upcoming else "")
        request = {"op": op, "service": self.ref.service, "username": user, **extra}
        return await child(request, self.name)

    async def _get(self, upcoming: bool) -> str | None:
        value = (await self._op("get", upcoming)).get("secret")
        return value if isinstance(value, str) else None

    async def _put(self, secret: str, upcoming: bool) -> None:
        await self._op("set", upcoming, secret=secret)

    async def drop_upcoming(self) -> None:
        await self._op("delete", upcoming=True)


@register
@dataclass(frozen=True)
class KeyringRef(SecretRef):
    """An item of the OS keyring: service ``token-broker`` and the credential's name as
    username by default, or the ``SERVICE/USERNAME`` written in the reference."""

    kind = "keyring"
    writable = True
    writer_class = KeyringWriter
    owned = True
    shapes = ("keyring", "keyring:SERVICE/USERNAME")
    bare = True
    service: str = SERVICE
    user: str = ""

    @classmethod
    def from_text(cls, text: str, rest: str | None, credential: str) -> KeyringRef | None:
        if rest is None:
            return cls(text, SERVICE, credential)
        service, slash, user = rest.partition("/")
        return cls(text, service, user) if slash and service and user.strip() else None

    def describe(self) -> str:
        return f"keyring item service={self.service!r} username={self.user!r}"

    async def read(self, name: str, ctx: Context = NO_CONTEXT) -> tuple[str, ...]:
        answer = await child({"op": "read", "service": self.service, "username": self.user}, name)
        return tuple(answer["secrets"])

    async def store_new(
        self, name: str, values: list[str], *, force: bool = False, ctx: Context = NO_CONTEXT
    ) -> Stored:
        items = [self.user, self.user + NEXT_SUFFIX][: len(values)]
        try:
            backend(name)
        except SecretError as exc:  # a headless host: name the option that gets past it
            cause = str(exc).removesuffix(WAY_OUT).rstrip("; ")
            raise SecretError(
                f"{cause}; start a Secret Service (e.g. gnome-keyring), or pass --secret "
                "file:PATH (a 0600 file the daemon reads) or --secret systemd:NAME (for the "
                "system service)"
            ) from None
        for item, value in zip(items, values, strict=True):
            if get(self.service, item, name) not in (None, value) and not force:
                raise SecretError(
                    f"credential {name!r}: the keyring already holds service={self.service!r} "
                    f"username={item!r}; remove it first (`token-broker remove {name}` or "
                    "secret-tool), or pass --force to replace it"
                )
        written: list[str] = []

        async def undo() -> None:
            for item in written:
                delete(self.service, item, name)

        try:
            for item, value in zip(items, values, strict=True):
                store(self.service, item, value, name)
                written.append(item)
        except BaseException:
            await undo()
            raise
        where = f"the keyring (service {self.service!r}, username {self.user!r})"
        return Stored(where, len(written), [], undo)

    def check_removal(self, name: str) -> None:
        backend(name)  # SecretError naming why the keyring is unusable

    async def remove(self, name: str) -> list[str]:
        return [
            f"{self.service}/{item}"
            for item in (self.user, self.user + NEXT_SUFFIX)
            if delete(self.service, item, name)
        ]


# -- the child process ------------------------------------------------------------------


def child_environment() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if k in _CHILD_ENV_NAMES or k.startswith(_CHILD_ENV_PREFIXES)
    }


async def child(request: dict[str, str], name: str) -> dict[str, Any]:
    """Run one keyring operation (see :mod:`broker.stores.keyring_child`) in a child process;
    the request, a secret to store included, travels only through the child's stdin."""
    data = json.dumps({**request, "name": name}).encode()
    argv = (sys.executable, "-m", "broker.stores.keyring_child")
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=PIPE, stdout=PIPE, stderr=PIPE, env=child_environment()
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(data), TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise SecretError(
            f"credential {name!r}: the keyring did not answer within {TIMEOUT:g}s "
            f"(a locked collection waiting for an unlock prompt?); {WAY_OUT}"
        ) from None
    try:
        answer: dict[str, Any] = json.loads(out)
    except ValueError:
        detail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise SecretError(
            f"credential {name!r}: the keyring reader failed ({detail[0][:200]}); {WAY_OUT}"
        ) from None
    if "error" in answer:
        raise SecretError(answer["error"])
    return answer


# -- the backend, in this process (blocking) --------------------------------------------


def read(service: str, user: str, name: str) -> tuple[str, ...]:
    """The item and, during a rotation, its ``#next`` sibling (the new one first)."""
    current, upcoming = get(service, user, name), get(service, user + NEXT_SUFFIX, name)
    if current is None and upcoming is None:
        raise SecretError(
            f"credential {name!r}: no keyring item service={service!r} username={user!r} "
            f"in {_backend_name(backend(name))}; store it with `token-broker add {name} ...`"
        )
    return tuple(s for s in (upcoming, current) if s is not None)


def store(service: str, user: str, secret: str, name: str) -> None:
    _call(backend(name), name, "set_password", service, user, secret)


def delete(service: str, user: str, name: str) -> bool:
    """Delete an item; False if it was not there."""
    if get(service, user, name) is None:
        return False
    _call(backend(name), name, "delete_password", service, user)
    return True


def get(service: str, user: str, name: str) -> str | None:
    value = _call(backend(name), name, "get_password", service, user)
    return value if isinstance(value, str) else None


def backend(name: str) -> Any:
    """The keyring backend in use, or SecretError that names why there is none."""
    import keyring  # lazy: only processes that touch the keyring pay for it
    from keyring.backends import fail

    found = keyring.get_keyring()
    if isinstance(found, fail.Keyring):
        raise SecretError(
            f"credential {name!r}: no keyring backend is available "
            f"({_backend_name(found)}: {diagnose_no_backend()}); {WAY_OUT}"
        )
    return found


def diagnose_no_backend() -> str:
    """Why keyring fell back to its fail backend, as far as we can tell (Linux)."""
    if os.environ.get("PYTHON_KEYRING_BACKEND", "").endswith("fail.Keyring"):
        return "PYTHON_KEYRING_BACKEND selects the fail backend"
    if sys.platform != "linux":
        return "keyring found no usable backend on this system"
    address = os.environ.get("DBUS_SESSION_BUS_ADDRESS")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if not address and not (runtime and os.path.exists(os.path.join(runtime, "bus"))):
        return "no D-Bus session bus (DBUS_SESSION_BUS_ADDRESS is not set)"
    try:
        from jeepney.bus_messages import message_bus
        from jeepney.io.blocking import open_dbus_connection
    except ImportError:
        return "the Secret Service libraries (secretstorage, jeepney) are not installed"
    try:
        with open_dbus_connection(bus="SESSION") as conn:
            has_owner = message_bus.NameHasOwner("org.freedesktop.secrets")
            owned = conn.send_and_get_reply(has_owner, timeout=5).body[0]
            names = conn.send_and_get_reply(message_bus.ListActivatableNames(), timeout=5).body[0]
    except Exception as exc:  # connection refused, bad address, timeout
        return f"cannot connect to the D-Bus session bus ({type(exc).__name__}: {exc})"
    if not owned and "org.freedesktop.secrets" not in names:
        return "no Secret Service provider (org.freedesktop.secrets) on the session bus"
    return "the Secret Service on the session bus did not answer keyring's probe"


def _backend_name(found: object) -> str:
    return f"{type(found).__module__}.{type(found).__name__}"


def _call(found: Any, name: str, method: str, *args: str) -> Any:
    """Call a backend method, turning every failure into a SecretError that explains it."""
    try:
        return getattr(found, method)(*args)
    except Exception as exc:  # keyring and D-Bus libraries raise many unrelated types
        raise SecretError(
            f"credential {name!r}: keyring backend {_backend_name(found)} failed: "
            f"{_cause(exc)}; {WAY_OUT}"
        ) from None


def _cause(exc: Exception) -> str:
    """Name the cause in words a user can act on, from the exception types of keyring,
    secretstorage and jeepney (anywhere in the chain of causes)."""
    from broker.errors import causes

    text = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
    locked, unavailable = _failure_types()
    for inner in causes(exc):
        if isinstance(inner, locked):
            return f"the collection is locked ({text}); unlock it (e.g. log in to the desktop)"
        # A jeepney error reply (DBusErrorResponse) has the D-Bus error's name.
        if isinstance(inner, unavailable) or getattr(inner, "name", None) == _SERVICE_UNKNOWN:
            return f"no Secret Service provider on the session bus ({text})"
        if isinstance(inner, FileNotFoundError | ConnectionRefusedError) or (
            isinstance(inner, KeyError) and "DBUS_SESSION_BUS_ADDRESS" in inner.args
        ):
            return f"no D-Bus session bus ({text})"
    return text


_SERVICE_UNKNOWN = "org.freedesktop.DBus.Error.ServiceUnknown"


def _failure_types() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(a locked collection, no Secret Service): the types that say so, as installed."""
    from keyring.errors import KeyringLocked

    try:  # the Secret Service backend's libraries (Linux only)
        from secretstorage.exceptions import LockedException, SecretServiceNotAvailableException
    except ImportError:
        return (KeyringLocked,), ()
    return (KeyringLocked, LockedException), (SecretServiceNotAvailableException,)
