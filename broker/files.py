"""Files the daemon writes: one atomic writer, and the one state directory.

The local CA (:mod:`broker.tls`), the file outputs (:mod:`broker.outputs`),
``file:`` secrets rewritten by secret cycling and the cycling state
(:mod:`broker.cycling`) all go through :func:`atomic_write`, so each of them
is either the old file or the new one, never a torn write, and has its mode
(and owner) from its first byte.

What the daemon keeps for itself (the state directory, its ``cycling/``, the
runtime directory where the CA is published) decides what it deletes at
Adobe and which CA tools trust, so it is trusted only as OpenSSH's
StrictModes trusts ``~/.ssh`` (:func:`check_dir`, :func:`open_private`); each
refusal is one sentence that names the path and the fix.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

from broker.errors import UnsafePath

#: Bits that let someone other than the owner change a file or a directory's entries.
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH
#: The largest file :func:`read_private` reads: certificates, keys, state, a CA bundle.
MAX_PRIVATE_FILE = 4 * 1024 * 1024


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
    return Path(env.get("HOME") or Path.home()) / ".local" / "state" / "token-broker"


def make_private_dir(directory: Path) -> None:
    """Create ``directory`` 0700 (parents as the umask says); leave an existing one, but
    refuse it unless :func:`check_dir` trusts it."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    directory.mkdir(mode=0o700, exist_ok=True)  # the umask can only narrow it
    check_dir(directory)


def check_dir(directory: Path) -> None:
    """Refuse ``directory`` unless only this user (and root) can change what is in it.

    The directory itself must belong to this user and be writable by neither
    group nor others; every directory above it must belong to this user or
    root and be writable by neither, unless it has the sticky bit (``/tmp``:
    there nobody renames or removes what another user owns). Symlinks are
    resolved first: systemd's ``DynamicUser=`` makes ``/var/lib/NAME`` a link
    into ``/var/lib/private``. FileNotFoundError when it does not exist.
    """
    euid = os.geteuid()
    real = Path(os.path.realpath(directory))
    st = os.stat(real)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"{directory} is not a directory: remove it (token-broker creates "
                         "the directory, mode 0700)")  # fmt: skip
    _judge(directory, st, euid, owners=(euid,), fix_owner=f"remove it (token-broker "
           f"creates it again, mode 0700) or run `chown {euid} {directory}`")  # fmt: skip
    for parent in real.parents:
        st = os.stat(parent)
        if st.st_mode & stat.S_ISVTX and st.st_uid in (euid, 0):
            continue  # sticky (/tmp): what is ours in it stays ours
        _judge(parent, st, euid, owners=(euid, 0), above=directory,
               fix_owner="use a directory that only this user or root can change")  # fmt: skip


def _judge(
    path: Path,
    st: os.stat_result,
    euid: int,
    *,
    owners: tuple[int, ...],
    fix_owner: str,
    above: Path | None = None,
) -> None:
    where = f"{path} (which holds {above})" if above is not None else str(path)
    if st.st_uid not in owners:
        raise UnsafePath(
            f"{where} is owned by uid {st.st_uid}, not by this user (uid {euid}), so another "
            f"user could change what token-broker keeps there: {fix_owner}"
        )
    if st.st_mode & _OTHERS_WRITE:
        raise UnsafePath(
            f"{where} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}), so "
            f"another user could change what token-broker keeps there: run `chmod go-w {path}`"
        )


def open_private(path: Path, flags: int, mode: int = 0o600) -> int:
    """``os.open`` for a file in a directory :func:`check_dir` trusts: never through a
    symlink, never a FIFO or device, and refused when another user owns it or may write it;
    FileNotFoundError when it does not exist (and ``flags`` has no O_CREAT)."""
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # a planted FIFO must not block us
    try:
        fd = os.open(path, flags, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePath(
                f"{path} is a symbolic link, which token-broker does not follow in its own "
                "directories: remove it"
            ) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(f"{path} is not a regular file: remove it")
        _judge(path, st, os.geteuid(), owners=(os.geteuid(),), fix_owner="remove it")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_private(path: Path, limit: int = MAX_PRIVATE_FILE) -> bytes:
    """The content of a file :func:`open_private` accepts (at most ``limit`` bytes)."""
    with os.fdopen(open_private(path, os.O_RDONLY), "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UnsafePath(f"{path} is larger than {limit // 1024} KiB: remove it")
    return data


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
