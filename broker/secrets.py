"""Secret references (DESIGN §3) resolved to the secret itself.

``keyring`` / ``keyring:SERVICE/USERNAME``, ``systemd:NAME``, ``file:/path``
and ``env:VAR``. The daemon reads keyring items in a child process (see
:func:`_keyring_in_child`), so the event loop never blocks on D-Bus and the
daemon never imports keyring; the CLI, a short-lived process, writes items
with :func:`store_keyring` and friends directly.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from broker.errors import SecretError

if TYPE_CHECKING:
    from broker.config import Settings

KEYRING_SERVICE = "token-broker"
WAY_OUT = "start a Secret Service (e.g. gnome-keyring) or use a systemd: or file: secret"
_EXPECTED = (
    'expected "keyring", "keyring:SERVICE/USERNAME", "systemd:NAME", '
    '"file:/absolute/path" or "env:VAR"'
)


@dataclass(frozen=True)
class SecretRef:
    """A ``secret = …`` reference (DESIGN §3), parsed once when the config is loaded.

    ``kind`` says where the secret lives; the other fields are that place:
    ``service``/``user`` of a keyring item (the default item is service
    ``token-broker``, username = the credential's name), ``path`` of a file,
    ``name`` of a systemd credential, ``variable`` of an environment variable.
    """

    text: str  # as written in the config
    kind: Literal["keyring", "systemd", "file", "env"]
    service: str = ""
    user: str = ""
    path: Path | None = None
    name: str = ""
    variable: str = ""

    @classmethod
    def parse(cls, text: str, credential: str) -> SecretRef:
        """The reference ``text`` of ``credential``; ValueError with a sentence if malformed."""
        kind, sep, rest = text.partition(":")
        if text == "keyring":
            return cls(text, "keyring", service=KEYRING_SERVICE, user=credential)
        if sep and rest.strip():
            if kind == "keyring":
                service, slash, user = rest.partition("/")
                if slash and service and user:
                    return cls(text, "keyring", service=service, user=user)
            elif kind == "systemd":
                return cls(text, "systemd", name=rest)
            elif kind == "file" and os.path.isabs(rest):
                return cls(text, "file", path=Path(rest))
            elif kind == "env":
                return cls(text, "env", variable=rest)
        raise ValueError(f"{_EXPECTED}, got {text!r}")

    def __str__(self) -> str:
        return self.text

    def describe(self) -> str:
        """Where the reference points, in words (for errors, `list` and `doctor`)."""
        if self.kind == "keyring":
            return f"keyring item service={self.service!r} username={self.user!r}"
        if self.kind == "systemd":
            return f"systemd credential {self.name!r}"
        if self.kind == "file":
            return f"file {self.path}"
        return f"environment variable {self.variable}"

    def unwritable(self) -> str | None:
        """Why secret cycling (DESIGN §11) cannot write a new secret here, or None if it can.

        Cycling stores the new secret beside the current one and then replaces it:
        a keyring item or a ``file:`` whose file and directory this process may write.
        """
        if self.kind == "keyring":
            return None
        if self.kind == "systemd":
            return (
                "a systemd credential is a read-only copy made at the service's start, so "
                'the daemon cannot store a new secret there; use secret = "keyring" or a '
                "file: secret in a directory the service may write (e.g. its StateDirectory)"
            )
        if self.kind == "env":
            return (
                f"an environment variable ({self.variable}) cannot be changed for the next "
                'start by the daemon; use secret = "keyring" or a file: secret it may write'
            )
        assert self.path is not None
        directory = self.path.parent
        if not os.access(directory, os.W_OK | os.X_OK):
            return (
                f"the directory {directory} of the secret file is not writable by this "
                f"process (uid {os.getuid()}); cycling replaces the file atomically, which "
                "needs a writable directory (a mounted Kubernetes Secret is read-only)"
            )
        if self.path.exists() and not os.access(self.path, os.W_OK):
            return (
                f"the secret file {self.path} is read-only to this process (uid "
                f'{os.getuid()}); make it writable (chmod 600) or use secret = "keyring"'
            )
        return None

    def file(self) -> Path | None:
        """The file a ``file:`` or ``systemd:`` reference reads, or None (other kinds, or a
        ``systemd:`` reference outside systemd, where $CREDENTIALS_DIRECTORY is unset)."""
        if self.kind == "file":
            return self.path
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if self.kind == "systemd" and directory:
            return Path(directory) / self.name
        return None


@dataclass(frozen=True)
class FileMode:
    """The permission bits of a file the daemon trusts, and what is wrong with them."""

    path: Path
    what: str
    mode: int
    problem: str | None  # a sentence naming the file and the fix, or None when fine


def file_modes(settings: Settings) -> list[FileMode]:
    """Check the config file and every secret file the config names.

    A secret file must not be readable by group or others. The config file
    holds no secret (client keys only as hashes), so it may be readable, as a
    system service with ``DynamicUser=`` needs; but whoever can write it can
    point ``token_url`` at their own server and receive the secret, so it must
    not be writable by group or others.
    """
    found: list[FileMode] = []
    if settings.path is not None:
        found.extend(_file_mode(settings.path, "config file", secret=False))
    for name, cred in settings.credentials.items():
        if (target := cred.secret.file()) is not None:
            found.extend(_file_mode(target, f"secret file of {name!r}", secret=True))
    return found


def _file_mode(path: Path, what: str, *, secret: bool) -> list[FileMode]:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return []  # a missing file is reported where it is read, with its own message
    problem = None
    if secret and mode & 0o077:
        problem = (
            f"{what} {path} has mode {mode:04o}: group or others can read the secret; "
            f"run `chmod 600 {path}` (Kubernetes: defaultMode: 0400)"
        )
    elif not secret and mode & 0o022:
        problem = (
            f"{what} {path} has mode {mode:04o}: group or others can change where the "
            f"secret is sent; run `chmod go-w {path}`"
        )
    return [FileMode(path, what, mode, problem)]


async def resolve(ref: SecretRef, name: str) -> tuple[str, ...]:
    """Return the secrets ``ref`` points at for credential ``name``, preferred first.

    One secret, or two while a keyring secret is being rotated (the new one
    first, the old one as a fallback). Raises SecretError with a message that
    says what failed and what to do; it never contains the secret.
    """
    if ref.kind == "keyring":
        return await _keyring_in_child(ref.service, ref.user, name)
    if ref.kind == "env":
        value = os.environ.get(ref.variable)
        if not value:
            raise SecretError(
                f"credential {name!r}: environment variable {ref.variable} is not set"
            )
        return (value,)
    path = ref.file()
    if path is None:
        raise SecretError(
            f"credential {name!r}: secret {ref} needs $CREDENTIALS_DIRECTORY; "
            "run under systemd with LoadCredential= or LoadCredentialEncrypted="
        )
    current = _from_file(path, name, ref.describe())
    if ref.kind == "file" and (upcoming := next_file(path)).exists():
        # Secret cycling stored a new secret beside this one: preferred, the old as fallback.
        return (_from_file(upcoming, name, f"file {upcoming}"), current)
    return (current,)


def next_file(path: Path) -> Path:
    """Where a new ``file:`` secret waits during a cycle (as ``NAME#next`` in the keyring)."""
    return path.with_name(path.name + NEXT_FILE_SUFFIX)


#: Suffix of the keyring item that holds the new secret during a rotation. '#' is
#: outside the credential-name alphabet, so it cannot collide with another credential.
NEXT_SUFFIX = "#next"
NEXT_FILE_SUFFIX = ".next"
KEYRING_TIMEOUT = 20.0
#: What a keyring child process inherits: what keyring and D-Bus need, nothing else,
#: so that an ``env:`` secret of another credential never reaches it.
_CHILD_ENV_PREFIXES = ("DBUS_", "XDG_", "PYTHON", "KEYRING_", "LC_", "GNOME_KEYRING_")
_CHILD_ENV_NAMES = {"HOME", "PATH", "LANG", "USER", "LOGNAME", "VIRTUAL_ENV", "TMPDIR"}


def child_environment() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if k in _CHILD_ENV_NAMES or k.startswith(_CHILD_ENV_PREFIXES)
    }


async def _keyring_in_child(service: str, user: str, name: str) -> tuple[str, ...]:
    """Read a keyring item (and its ``#next`` sibling) in a short-lived child process.

    The daemon itself never imports keyring: its Secret Service backend pulls
    in ``cryptography`` (~9 MB resident for a secret read once), and a D-Bus
    call stuck on a locked collection can be killed in a child, not in a thread.
    """
    answer = await keyring_child({"op": "read", "service": service, "username": user}, name)
    return tuple(answer["secrets"])


async def keyring_child(request: dict[str, str], name: str) -> dict[str, Any]:
    """Run one keyring operation (see :mod:`broker.keyring_child`) in a child process.

    The request, a secret to store included, travels only through the child's stdin.
    """
    data = json.dumps({**request, "name": name}).encode()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker.keyring_child",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=child_environment(),
    )
    try:
        async with asyncio.timeout(KEYRING_TIMEOUT):
            out, err = await proc.communicate(data)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise SecretError(
            f"credential {name!r}: the keyring did not answer within {KEYRING_TIMEOUT:g}s "
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


def read_keyring(service: str, user: str, name: str) -> tuple[str, ...]:
    """Read the item and, during a rotation, its ``#next`` sibling (blocking, in-process)."""
    backend = keyring_backend(name)
    current = _keyring_call(backend, name, "get_password", service, user)
    upcoming = _keyring_call(backend, name, "get_password", service, user + NEXT_SUFFIX)
    if current is None and upcoming is None:
        raise SecretError(
            f"credential {name!r}: no keyring item service={service!r} username={user!r} "
            f"in {_backend_name(backend)}; store it with `token-broker add {name} ...`"
        )
    return tuple(s for s in (upcoming, current) if s is not None)


def store_keyring(service: str, user: str, secret: str, name: str) -> None:
    backend = keyring_backend(name)
    _keyring_call(backend, name, "set_password", service, user, secret)


def delete_keyring(service: str, user: str, name: str) -> bool:
    """Delete an item; False if it was not there."""
    backend = keyring_backend(name)
    if _keyring_call(backend, name, "get_password", service, user) is None:
        return False
    _keyring_call(backend, name, "delete_password", service, user)
    return True


def get_keyring(service: str, user: str, name: str) -> str | None:
    return _keyring_call(keyring_backend(name), name, "get_password", service, user)  # type: ignore[no-any-return]


def keyring_backend(name: str) -> Any:
    """The keyring backend in use, or SecretError that names why there is none."""
    import keyring  # lazy: only processes that touch the keyring pay for it
    from keyring.backends import fail

    backend = keyring.get_keyring()
    if isinstance(backend, fail.Keyring):
        raise SecretError(
            f"credential {name!r}: no keyring backend is available "
            f"({_backend_name(backend)}: {diagnose_no_backend()}); {WAY_OUT}"
        )
    return backend


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
        from jeepney import DBusAddress, new_method_call
        from jeepney.io.blocking import open_dbus_connection
    except ImportError:
        return "the Secret Service libraries (secretstorage, jeepney) are not installed"
    try:
        with open_dbus_connection(bus="SESSION") as conn:
            bus = DBusAddress(
                "/org/freedesktop/DBus", bus_name="org.freedesktop.DBus",
                interface="org.freedesktop.DBus",
            )  # fmt: skip
            owned = conn.send_and_get_reply(
                new_method_call(bus, "NameHasOwner", "s", ("org.freedesktop.secrets",)), timeout=5
            ).body[0]
            names = conn.send_and_get_reply(
                new_method_call(bus, "ListActivatableNames"), timeout=5
            ).body[0]
    except Exception as exc:  # connection refused, bad address, timeout
        return f"cannot connect to the D-Bus session bus ({type(exc).__name__}: {exc})"
    if not owned and "org.freedesktop.secrets" not in names:
        return "no Secret Service provider (org.freedesktop.secrets) on the session bus"
    return "the Secret Service on the session bus did not answer keyring's probe"


def _backend_name(backend: object) -> str:
    return f"{type(backend).__module__}.{type(backend).__name__}"


def _keyring_call(backend: Any, name: str, method: str, *args: str) -> Any:
    """Call a backend method, turning every failure into a SecretError that explains it."""
    try:
        return getattr(backend, method)(*args)
    except Exception as exc:  # keyring and D-Bus libraries raise many unrelated types
        raise SecretError(
            f"credential {name!r}: keyring backend {_backend_name(backend)} failed: "
            f"{_keyring_cause(exc)}; {WAY_OUT}"
        ) from None


def _keyring_cause(exc: Exception) -> str:
    """Name the cause in words a user can act on, from the exception types of keyring,
    secretstorage and jeepney (anywhere in the chain of causes)."""
    text = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
    locked, unavailable = _failure_types()
    for inner in _chain(exc):
        if isinstance(inner, locked):
            return f"the collection is locked ({text}); unlock it (e.g. log in to the desktop)"
        if isinstance(inner, unavailable) or _dbus_error(inner) == _SERVICE_UNKNOWN:
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

    locked: list[type[BaseException]] = [KeyringLocked]
    unavailable: list[type[BaseException]] = []
    try:  # the Secret Service backend's libraries (Linux only)
        from secretstorage.exceptions import LockedException, SecretServiceNotAvailableException
    except ImportError:
        pass
    else:
        locked.append(LockedException)
        unavailable.append(SecretServiceNotAvailableException)
    return tuple(locked), tuple(unavailable)


def _dbus_error(exc: BaseException) -> str | None:
    """The D-Bus error name of a jeepney error reply, if ``exc`` is one."""
    try:
        from jeepney.wrappers import DBusErrorResponse
    except ImportError:
        return None
    return exc.name if isinstance(exc, DBusErrorResponse) else None


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from, innermost last (bounded)."""
    found = [exc]
    while len(found) < 10 and (inner := found[-1].__cause__ or found[-1].__context__):
        found.append(inner)
    return found


def _from_file(path: Path, name: str, what: str) -> str:
    try:
        data = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SecretError(f"credential {name!r}: {what} does not exist") from None
    except PermissionError:
        raise SecretError(
            f"credential {name!r}: {what} is not readable by this user (uid {os.getuid()})"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not UTF-8 text"
        raise SecretError(f"credential {name!r}: cannot read {what}: {reason}") from None
    secret = data[:-1] if data.endswith("\n") else data
    if secret.endswith("\r"):
        secret = secret[:-1]
    if not secret:
        raise SecretError(f"credential {name!r}: {what} is empty")
    return secret


# -- writing secrets (secret cycling, DESIGN §11) ---------------------------------------


class SecretStore:
    """Where a cycled secret is written: the current secret and, during a cycle, the
    upcoming one beside it (keyring ``NAME#next``, or the file ``PATH.next``).

    Every method is idempotent, so a cycle resumed after a crash may repeat any of them.
    """

    def __init__(self, ref: SecretRef, name: str) -> None:
        self.ref = ref
        self.name = name

    @staticmethod
    def of(ref: SecretRef, name: str) -> SecretStore:
        """The store of ``ref``; SecretError with the sentence of :meth:`SecretRef.unwritable`."""
        problem = ref.unwritable()
        if problem is not None:
            raise SecretError(f"credential {name!r}: secret cycling cannot use {ref}: {problem}")
        return KeyringStore(ref, name) if ref.kind == "keyring" else FileStore(ref, name)

    async def current(self) -> str | None:
        raise NotImplementedError

    async def upcoming(self) -> str | None:
        raise NotImplementedError

    async def put_upcoming(self, secret: str) -> None:
        raise NotImplementedError

    async def drop_upcoming(self) -> None:
        raise NotImplementedError

    async def promote(self) -> None:
        """Make the upcoming secret the current one; nothing if there is none (done before)."""
        raise NotImplementedError


class KeyringStore(SecretStore):
    """Items ``NAME`` and ``NAME#next``, written by the keyring child process."""

    async def _op(self, op: str, user: str, **extra: str) -> dict[str, Any]:
        request = {"op": op, "service": self.ref.service, "username": user, **extra}
        return await keyring_child(request, self.name)

    async def current(self) -> str | None:
        return (await self._op("get", self.ref.user))["secret"]  # type: ignore[no-any-return]

    async def upcoming(self) -> str | None:
        return (await self._op("get", self.ref.user + NEXT_SUFFIX))["secret"]  # type: ignore[no-any-return]

    async def put_upcoming(self, secret: str) -> None:
        await self._op("set", self.ref.user + NEXT_SUFFIX, secret=secret)

    async def drop_upcoming(self) -> None:
        await self._op("delete", self.ref.user + NEXT_SUFFIX)

    async def promote(self) -> None:
        upcoming = await self.upcoming()
        if upcoming is None:
            return
        # Both items hold the new secret between these two steps: never a moment without it.
        await self._op("set", self.ref.user, secret=upcoming)
        await self.drop_upcoming()


class FileStore(SecretStore):
    """A ``file:`` secret and ``PATH.next``, replaced atomically with the file's mode and owner."""

    @property
    def path(self) -> Path:
        assert self.ref.path is not None
        return self.ref.path

    def _read(self, path: Path) -> str | None:
        try:
            return _from_file(path, self.name, f"file {path}")
        except SecretError:
            if path.exists():
                raise
            return None

    async def current(self) -> str | None:
        return self._read(self.path)

    async def upcoming(self) -> str | None:
        return self._read(next_file(self.path))

    async def put_upcoming(self, secret: str) -> None:
        self._write(next_file(self.path), secret)

    async def drop_upcoming(self) -> None:
        from broker.files import fsync_dir

        upcoming = next_file(self.path)
        if upcoming.exists():
            upcoming.unlink()
            fsync_dir(upcoming.parent)

    async def promote(self) -> None:
        upcoming = await self.upcoming()
        if upcoming is None:
            return
        self._write(self.path, upcoming)  # the new secret is in both files for a moment
        await self.drop_upcoming()

    def _write(self, target: Path, secret: str) -> None:
        from broker.files import atomic_write

        try:
            st = self.path.stat()  # the current file's mode and owner are kept
            mode, uid, gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
        except FileNotFoundError:
            mode, uid, gid = 0o600, -1, -1
        try:
            atomic_write(target, (secret + "\n").encode(), mode, uid=uid, gid=gid)
        except OSError as exc:
            raise SecretError(
                f"credential {self.name!r}: cannot write {target}: {exc.strerror or exc}"
            ) from None
