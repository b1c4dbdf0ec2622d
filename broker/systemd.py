"""systemd integration without a dependency: sd_notify and socket activation.

Both protocols are a few lines each (``sd_notify(3)``, ``sd_listen_fds(3)``),
so they are implemented here on the standard library. Outside systemd
(no ``$NOTIFY_SOCKET``, no ``$LISTEN_FDS``) every function is a no-op.
"""

from __future__ import annotations

import os
import socket

from broker.errors import ConfigError

SD_LISTEN_FDS_START = 3


def notify(*lines: str) -> bool:
    """Send ``KEY=VALUE`` lines to the service manager; False when not under systemd."""
    if not (address := os.environ.get("NOTIFY_SOCKET")):
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(lines).encode())
    except OSError:
        return False  # the manager went away; nothing we can do about it here
    return True


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of ``WatchdogSec=``), or None when off."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None


def listen_sockets(*, allow_remote: bool = False) -> list[socket.socket]:
    """The sockets passed by socket activation ([] when none), each a listening stream
    socket on loopback or a unix socket (any address with the config's ``allow_remote``):
    the guards (docs/security.md) hold for passed sockets exactly as for our own."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    sockets = []
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        sock = socket.socket(fileno=fd)
        os.set_inheritable(fd, False)
        label = names[i] if i < len(names) and names[i] else f"fd {fd}"
        _check_passed(sock, label, allow_remote)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sockets.append(sock)
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)  # children must not think the sockets are theirs
    return sockets


def _check_passed(sock: socket.socket, label: str, allow_remote: bool) -> None:
    from broker.net import is_loopback

    if sock.type != socket.SOCK_STREAM:
        raise ConfigError(f"socket activation: {label} is not a stream socket")
    if sock.family == socket.AF_UNIX:
        return
    host = sock.getsockname()[0]
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise ConfigError(f"socket activation: {label} is not a TCP or unix socket")
    if not allow_remote and not is_loopback(host):
        raise ConfigError(
            f"socket activation: {label} listens on {host}: loopback is required "
            "(ListenStream=127.0.0.1:PORT, [::1]:PORT or a unix socket)"
        )


def listen_name(sock: socket.socket) -> str:
    """A bound socket in the config's own ``listen`` notation."""
    from broker.config import TcpListen, UnixListen

    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return str(UnixListen(name))
    return str(TcpListen(name[0], name[1]))
