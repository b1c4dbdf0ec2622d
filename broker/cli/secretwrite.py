"""Writing a new credential's secret where its ``secret`` reference points, one writer
per reference kind (``add`` and ``import``).

Kept apart on purpose: these writers belong with the secret stores, one per
reference kind, and move there as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from broker import secrets
from broker.errors import SecretError
from broker.secrets import SecretRef


@dataclass
class Stored:
    """Where ``add``/``import`` put a credential's secret(s), and how to take them back."""

    where: str  # in words, for the command's output
    count: int  # secrets written (0: the user writes them, see ``todo``)
    todo: list[str] = field(default_factory=list)  # commands the user still has to run
    undo: Callable[[], None] = field(default=lambda: None, repr=False)


SecretWriter = Callable[[SecretRef, str, list[str], bool], Stored]


def write_secret(ref: SecretRef, name: str, values: list[str], *, force: bool = False) -> Stored:
    """Write the secret(s) of a new credential ``name`` where ``ref`` points.

    ``values``: one secret, or two (a Console project may list two client secrets;
    the second goes where a rotation keeps the new one: ``NAME#next`` or ``PATH.next``).
    A writer checks before it writes, and never replaces a different secret unless
    ``force``. Adding a reference kind means adding its writer to ``SECRET_WRITERS``.
    """
    writer = SECRET_WRITERS.get(ref.kind)
    if writer is None:
        raise SecretError(
            f"credential {name!r}: token-broker cannot write a {ref.kind}: secret; store it "
            "there yourself, or use keyring, file:PATH or systemd:NAME"
        )
    return writer(ref, name, values, force)


def _write_keyring(ref: SecretRef, name: str, values: list[str], force: bool) -> Stored:
    service, user = ref.service, ref.user
    items = [user, user + secrets.NEXT_SUFFIX][: len(values)]
    try:
        secrets.keyring_backend(name)
    except SecretError as exc:  # a headless host: name the option that gets past it
        cause = str(exc).removesuffix(secrets.WAY_OUT).rstrip("; ")
        raise SecretError(
            f"{cause}; start a Secret Service (e.g. gnome-keyring), or pass --secret "
            "file:PATH (a 0600 file the daemon reads) or --secret systemd:NAME (for the "
            "system service)"
        ) from None
    for item in items:
        present = secrets.get_keyring(service, item, name)
        if present is not None and present != values[items.index(item)] and not force:
            raise SecretError(
                f"credential {name!r}: the keyring already holds service={service!r} "
                f"username={item!r}; remove it first (`token-broker remove {name}` or "
                "secret-tool), or pass --force to replace it"
            )
    stored: list[str] = []
    try:
        for item, value in zip(items, values, strict=True):
            secrets.store_keyring(service, item, value, name)
            stored.append(item)
    except BaseException:
        for item in stored:
            secrets.delete_keyring(service, item, name)
        raise

    def undo() -> None:
        for item in stored:
            secrets.delete_keyring(service, item, name)

    return Stored(f"the keyring (service {service!r}, username {user!r})", len(stored), [], undo)


def _write_file(ref: SecretRef, name: str, values: list[str], force: bool) -> Stored:
    """``file:PATH``: 0600, its directory made 0700 if missing; ``PATH.next`` for a second."""
    from broker.files import atomic_write, make_private_dir

    assert ref.path is not None
    paths = [ref.path, secrets.next_file(ref.path)][: len(values)]
    previous: dict[Path, bytes | None] = {}
    for path, value in zip(paths, values, strict=True):
        previous[path] = _existing(path, name, value, force)
    try:
        make_private_dir(ref.path.parent)
    except OSError as exc:
        raise SecretError(
            f"credential {name!r}: cannot create the directory {ref.path.parent}: "
            f"{exc.strerror or exc}"
        ) from None
    written: list[Path] = []

    def undo() -> None:
        for path in written:
            old = previous[path]
            if old is None:
                path.unlink(missing_ok=True)
            else:
                atomic_write(path, old, 0o600)

    try:
        for path, value in zip(paths, values, strict=True):
            data = (value + "\n").encode()
            if previous[path] == data:
                continue  # the same secret is there already
            atomic_write(path, data, 0o600)
            written.append(path)
    except OSError as exc:
        undo()
        raise SecretError(
            f"credential {name!r}: cannot write the secret file {path}: {exc.strerror or exc}"
        ) from None
    except BaseException:
        undo()
        raise
    where = f"the file {ref.path} (mode 0600)"
    if len(paths) > 1:
        where += f" and {paths[1]} (the second client secret, used as a rotation's new one)"
    return Stored(where, len(paths), [], undo)


def _existing(path: Path, name: str, value: str, force: bool) -> bytes | None:
    """The bytes of a secret file that may be replaced (None: none there); else SecretError."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SecretError(f"credential {name!r}: cannot read {path}: {exc.strerror}") from None
    if data.rstrip(b"\r\n") == value.encode() or force or not data.strip():
        return data
    raise SecretError(
        f"credential {name!r}: {path} exists and holds something else; pass --force to "
        "replace it, or name another file"
    )


def _write_systemd(ref: SecretRef, name: str, values: list[str], force: bool) -> Stored:
    """``systemd:NAME``: nothing is written here; systemd-creds encrypts it for the service."""
    target = f"/etc/credstore.encrypted/token-broker.{ref.name}"
    todo = [
        f"systemd-creds encrypt --name={ref.name} - {target}",
        f"LoadCredentialEncrypted={ref.name}:{target}",
    ]
    return Stored(f"systemd credential {ref.name!r} (not written yet: see below)", 0, todo)


def _refuse_env(ref: SecretRef, name: str, values: list[str], force: bool) -> Stored:
    raise SecretError(
        f"credential {name!r}: --secret env:{ref.variable} cannot be written: an "
        "environment variable belongs to whatever starts the daemon, not to token-broker; "
        "use keyring, file:PATH or systemd:NAME (or set the variable there yourself and "
        f'write secret = "env:{ref.variable}" in the config)'
    )


SECRET_WRITERS: dict[str, SecretWriter] = {
    "keyring": _write_keyring,
    "file": _write_file,
    "systemd": _write_systemd,
    "env": _refuse_env,
}
