"""``file:/path``: the content of a file, one trailing newline stripped (Docker and
Kubernetes secrets, a 0600 file on a headless host).

During a cycle or a rotation the new secret waits in ``PATH.next`` and is
preferred, the old one the fallback; the file is replaced atomically, with its
mode and owner kept.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from broker.errors import SecretError
from broker.files import atomic_write, fsync_dir, make_private_dir
from broker.stores.base import (
    NO_CONTEXT,
    Context,
    SecretRef,
    SecretWriter,
    Stored,
    read_file,
    register,
)


def next_file(path: Path) -> Path:
    """Where a new ``file:`` secret waits during a cycle (as ``NAME#next`` in the keyring)."""
    return path.with_name(path.name + ".next")


class FileWriter(SecretWriter):
    """The file and ``PATH.next``, replaced atomically with the file's mode and owner."""

    ref: FileRef

    async def _get(self, upcoming: bool) -> str | None:
        path = next_file(self.ref.path) if upcoming else self.ref.path
        try:
            return read_file(path, self.name, f"file {path}")
        except SecretError:
            if path.exists():
                raise
            return None

    async def _put(self, secret: str, upcoming: bool) -> None:
        target = next_file(self.ref.path) if upcoming else self.ref.path
        try:
            st = self.ref.path.stat()  # the current file's mode and owner are kept
            mode, uid, gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
        except FileNotFoundError:
            mode, uid, gid = 0o600, -1, -1
        try:
            atomic_write(target, (secret + "\n").encode(), mode, uid=uid, gid=gid)
        except OSError as exc:
            raise SecretError(
                f"credential {self.name!r}: cannot write {target}: {exc.strerror or exc}"
            ) from None

    async def drop_upcoming(self) -> None:
        upcoming = next_file(self.ref.path)
        if upcoming.exists():
            upcoming.unlink()
            fsync_dir(upcoming.parent)


@register
@dataclass(frozen=True)
class FileRef(SecretRef):
    kind = "file"
    writable = True
    writer_class = FileWriter
    shapes = ("file:/absolute/path",)
    path: Path = Path("/")

    @classmethod
    def from_text(cls, text: str, rest: str | None, credential: str) -> FileRef | None:
        return cls(text, Path(rest)) if rest and os.path.isabs(rest) else None

    def describe(self) -> str:
        return f"file {self.path}"

    async def read(self, name: str, ctx: Context = NO_CONTEXT) -> tuple[str, ...]:
        current = read_file(self.path, name, self.describe())
        if (upcoming := next_file(self.path)).exists():
            return (read_file(upcoming, name, f"file {upcoming}"), current)
        return (current,)

    def file(self) -> Path | None:
        return self.path

    def unwritable(self) -> str | None:
        """A new secret is written beside this one, then over it: the directory must be
        writable by this process (a mounted Kubernetes Secret is read-only), and the file."""
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

    async def store_new(
        self, name: str, values: list[str], *, force: bool = False, ctx: Context = NO_CONTEXT
    ) -> Stored:
        """0600, its directory made 0700 if missing; ``PATH.next`` for a second secret.
        Never over a file that holds something else, unless ``force``."""
        paths = [self.path, next_file(self.path)][: len(values)]
        previous = {p: _replaceable(p, name, v, force) for p, v in zip(paths, values, strict=True)}
        try:
            make_private_dir(self.path.parent)
        except OSError as exc:
            raise SecretError(
                f"credential {name!r}: cannot create the directory {self.path.parent}: "
                f"{exc.strerror or exc}"
            ) from None
        written: list[Path] = []

        async def undo() -> None:
            for path in written:
                if (old := previous[path]) is None:
                    path.unlink(missing_ok=True)
                else:
                    atomic_write(path, old, 0o600)

        for path, value in zip(paths, values, strict=True):
            data = (value + "\n").encode()
            if previous[path] == data:
                continue  # the same secret is there already
            try:
                atomic_write(path, data, 0o600)
            except OSError as exc:
                await undo()
                raise SecretError(
                    f"credential {name!r}: cannot write the secret file {path}: "
                    f"{exc.strerror or exc}"
                ) from None
            written.append(path)
        where = f"the file {self.path} (mode 0600)"
        if len(paths) > 1:
            where += f" and {paths[1]} (the second client secret, used as a rotation's new one)"
        return Stored(where, len(paths), [], undo)


def _replaceable(path: Path, name: str, value: str, force: bool) -> bytes | None:
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
