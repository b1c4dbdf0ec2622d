"""Files the daemon writes: one atomic writer, and the one state directory.

The local CA (:mod:`broker.tls`), the file outputs (:mod:`broker.outputs`),
``file:`` secrets rewritten by secret cycling and the cycling state
(:mod:`broker.console`) all go through :func:`atomic_write`, so each of them
is either the old file or the new one, never a torn write, and has its mode
(and owner) from its first byte.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path


def state_dir(env: Mapping[str, str] | None = None, *, euid: int | None = None) -> Path:
    """The directory of the daemon's own state (the local CA, the cycling state).

    ``$STATE_DIRECTORY`` when systemd set it (a unit with ``StateDirectory=token-broker``;
    the first entry if there are several), else ``$XDG_STATE_HOME/token-broker``, else
    ``/var/lib/token-broker`` for root, else ``~/.local/state/token-broker``.
    A relative ``$XDG_STATE_HOME`` is ignored, as the XDG spec says.
    """
    env = os.environ if env is None else env
    if systemd := env.get("STATE_DIRECTORY", ""):
        return Path(systemd.split(":")[0])
    xdg = env.get("XDG_STATE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "token-broker"
    if (os.geteuid() if euid is None else euid) == 0:
        return Path("/var/lib/token-broker")
    home = env.get("HOME") or str(Path.home())
    return Path(home) / ".local" / "state" / "token-broker"


def make_private_dir(directory: Path) -> None:
    """Create ``directory`` 0700 (parents as the umask says); leave an existing one."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    directory.mkdir(mode=0o700, exist_ok=True)  # the umask can only narrow it


def atomic_write(path: Path, data: bytes, mode: int, *, uid: int = -1, gid: int = -1) -> None:
    """Replace ``path`` atomically with ``data``: mode and owner set before any byte.

    A new temporary file beside ``path`` is created with O_EXCL and O_NOFOLLOW
    (never an existing file or a planted symlink) and at most mode 0600, given
    ``uid``/``gid`` (-1: unchanged) and then exactly ``mode`` whatever the
    umask, written, fsynced and renamed over ``path``; the directory is fsynced
    so that the rename survives a crash.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode & 0o600)  # never more than asked, even before the chown
    try:
        try:
            st = os.fstat(fd)
            if (uid != -1 and st.st_uid != uid) or (gid != -1 and st.st_gid != gid):
                # Only when it differs: under the system unit's seccomp filter chown is
                # refused whatever its arguments, and a new file is ours already.
                os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` survive a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
