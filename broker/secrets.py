"""Secret references (DESIGN §3) resolved to the secret itself.

``keyring`` / ``keyring:SERVICE/USERNAME``, ``systemd:NAME``, ``file:/path``
and ``env:VAR``. Keyring calls block (D-Bus round trips), so ``resolve``
runs them in a worker thread; keyring itself is imported only when a
credential uses it, because its backends cost several megabytes.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from broker.errors import SecretError

KEYRING_SERVICE = "token-broker"
_WAY_OUT = "start a Secret Service (e.g. gnome-keyring) or use a systemd: or file: secret"


def describe(ref: str, name: str) -> str:
    """Where a reference points, in words (for errors and `list`)."""
    kind, _, rest = ref.partition(":")
    if kind == "keyring":
        service, _, user = rest.partition("/") if rest else (KEYRING_SERVICE, "", name)
        return f"keyring item service={service!r} username={user!r}"
    if kind == "systemd":
        return f"systemd credential {rest!r}"
    if kind == "file":
        return f"file {rest}"
    return f"environment variable {rest}"


async def resolve(ref: str, name: str) -> str:
    """Return the secret ``ref`` points at for credential ``name``.

    Raises SecretError with a message that says what failed and what to do;
    it never contains the secret.
    """
    kind, _, rest = ref.partition(":")
    if kind == "keyring":
        service, _, user = rest.partition("/") if rest else (KEYRING_SERVICE, "", name)
        return await asyncio.to_thread(_from_keyring, service, user, name)
    if kind == "systemd":
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise SecretError(
                f"credential {name!r}: secret systemd:{rest} needs $CREDENTIALS_DIRECTORY; "
                "run under systemd with LoadCredential= or LoadCredentialEncrypted="
            )
        return _from_file(Path(directory) / rest, name, f"systemd credential {rest!r}")
    if kind == "file":
        return _from_file(Path(rest), name, f"file {rest}")
    if kind == "env":
        value = os.environ.get(rest)
        if not value:
            raise SecretError(f"credential {name!r}: environment variable {rest} is not set")
        return value
    raise SecretError(f"credential {name!r}: unknown secret reference kind {kind!r}")


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


def _from_keyring(service: str, user: str, name: str) -> str:
    import keyring  # lazy: only credentials that use the keyring pay for it
    from keyring.errors import KeyringError

    backend = keyring.get_keyring()
    backend_name = f"{type(backend).__module__}.{type(backend).__name__}"
    if "fail" in type(backend).__module__:
        raise SecretError(
            f"credential {name!r}: no keyring backend is available ({backend_name}); {_WAY_OUT}"
        )
    try:
        secret = backend.get_password(service, user)
    except KeyringError as exc:
        # Keyring's own message names the cause (locked collection, no D-Bus, ...);
        # it never holds the secret, since none was read.
        raise SecretError(
            f"credential {name!r}: keyring backend {backend_name} failed: {exc}; {_WAY_OUT}"
        ) from None
    except Exception as exc:  # D-Bus libraries raise their own types
        raise SecretError(
            f"credential {name!r}: keyring backend {backend_name} failed: "
            f"{type(exc).__name__}: {exc}; {_WAY_OUT}"
        ) from None
    if secret is None:
        raise SecretError(
            f"credential {name!r}: no keyring item service={service!r} username={user!r} "
            f"in {backend_name}; store it with `keyring set {service} {user}`"
        )
    return secret
