"""The running daemon, as the commands see it: where it is, a client for it
(:mod:`broker.client`), and what its refusals mean.

Every command that asks the daemon goes through :func:`asking` (or
:func:`connect`) and the client's methods; the client turns each answer other
than a 2xx into one of its errors (status, code and the daemon's detail, checked
for secrets), and :func:`explain` turns those into the sentence a command
prints: no answer is parsed twice.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from broker.cli import warn
from broker.errors import BrokerError

if TYPE_CHECKING:
    from broker.client import BrokerClientError, TokenBroker

#: Seconds a command waits for the daemon: a reload or a forced refresh waits for the
#: issuer (10 s per token request by default, plus a free slot).
TIMEOUT = 30.0

KEY_HINT = (
    "pass the client key with --key-file PATH, or name its file in "
    "$TOKEN_BROKER_CLIENT_KEY_FILE (or put the key in $TOKEN_BROKER_CLIENT_KEY)"
)


def connect(
    args: argparse.Namespace,
    *,
    from_config: bool = False,
    admin: bool = False,
    timeout: float = TIMEOUT,
) -> TokenBroker:
    """A client of the running daemon, with any extra header its config requires.

    ``--url``, else ``$TOKEN_BROKER_URL``, else the config's first listen address
    when a config file exists, else ``http://127.0.0.1:8765``, so the commands
    that only talk to the daemon need no config. ``from_config``: the daemon that
    serves this config (``add``, ``remove``... notify it). ``admin``: a reload or
    a cycle, asked over the config's unix socket when it has one, where the
    daemon knows the caller's uid and lets root and its own user in without a key.
    """
    from broker.client import URL_ENV, TokenBroker

    url = None if from_config else getattr(args, "url", None) or os.environ.get(URL_ENV)
    headers: dict[str, str] = {}
    if not url:  # the config is read (a costly import) only when it is where to look
        from broker import config
        from broker.config import TcpListen, UnixListen

        explicit = args.config or os.environ.get("TOKEN_BROKER_CONFIG")
        if explicit or config.config_path().exists():  # else: the default address
            settings = config.load(args.config)
            listens = settings.server.listen
            unix = [x for x in listens if isinstance(x, UnixListen)]
            listen = unix[0] if admin and unix else listens[0]
            url = f"http://{listen}" if isinstance(listen, TcpListen) else str(listen)
            header = settings.server.require_header
            # broker.client always sends X-Token-Broker: 1; a config may name another header.
            if header and header.lower() != "x-token-broker":
                headers[header] = "1"
    return TokenBroker(url, key=client_key(args), timeout=timeout, headers=headers)


def client_key(args: argparse.Namespace) -> str | None:
    """The client key from --key-file (never a command-line value); without it broker.client
    reads $TOKEN_BROKER_CLIENT_KEY, else the file $TOKEN_BROKER_CLIENT_KEY_FILE names."""
    path = getattr(args, "key_file", None)
    if not path:
        return None
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise BrokerError(f"--key-file {path}: {exc.strerror}") from None


# -- what a refusal means ---------------------------------------------------------------


def explain(exc: BrokerClientError, url: str, *, admin: bool = False) -> str:
    """Why the daemon did not do what was asked, and what to do about it. ``admin``: a
    reload or a cycle, which a 401 or 403 refuses for want of a key whose credentials
    are "*": the ways to get past it, the signal included."""
    said = f"{exc.code}: {exc.detail}"  # the daemon's answer in one phrase
    if exc.status is None or exc.code is None or exc.detail is None:
        said = str(exc)  # no answer: the client's own "cannot reach the token broker at URL"
    if admin and exc.status in (401, 403):
        return f"{said}; {admin_advice(url)}"
    if exc.status == 401:
        return f"{said}; {KEY_HINT}"
    return said


@contextmanager
def asking(
    args: argparse.Namespace,
    *,
    from_config: bool = False,
    admin: bool = False,
    timeout: float = TIMEOUT,
) -> Iterator[TokenBroker]:
    """:func:`connect`'s client for the block, closed after it; a client error raised in
    the block becomes a BrokerError with :func:`explain`'s sentence, which ``main`` prints
    (exit status 1)."""
    from broker.client import BrokerClientError

    with connect(args, from_config=from_config, admin=admin, timeout=timeout) as broker:
        try:
            yield broker
        except BrokerClientError as exc:
            raise BrokerError(explain(exc, broker.url, admin=admin)) from None


def admin_advice(url: str) -> str:
    """What to do when the daemon refused an administrator's request for want of a key."""
    hup = f"`kill -HUP {_daemon_pid(url) or '<pid of token-broker serve>'}`"
    advice = (
        'ask it with a client key whose credentials are "*" (--key-file PATH or '
        "$TOKEN_BROKER_CLIENT_KEY_FILE), or reload it by signal: "
        f"`systemctl reload token-broker` for the system service, else {hup}"
    )
    if url.startswith("unix:"):
        return (
            f"{advice} (over its unix socket only root and the daemon's own user need no key; "
            f"this is uid {os.getuid()})"
        )
    return (
        f"{advice}; with a unix socket in [server] listen, root and the daemon's own user "
        "reload it over that socket without a key"
    )


def _daemon_pid(url: str) -> int | None:
    """The pid of the daemon at ``url``, where this user may see it (else None)."""
    import socket
    import struct

    try:
        if url.startswith("unix:"):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(2)
                sock.connect(url[5:])
                creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                return struct.unpack("3i", creds)[0] or None
        from urllib.parse import urlsplit

        port = urlsplit(url).port
        return _listener_pid(port) if port else None
    except (OSError, ValueError):
        return None


def _listener_pid(port: int) -> int | None:
    """The process listening on loopback TCP ``port``, from /proc (Linux)."""
    from contextlib import suppress

    rows: list[list[str]] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with suppress(OSError):
            rows += [line.split() for line in Path(table).read_text().splitlines()[1:]]
    # State 0A is LISTEN; the local address ends in ":PORT", in hex.
    listening = [f for f in rows if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port]
    inodes = {f"socket:[{f[9]}]" for f in listening}
    if not inodes:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with suppress(OSError):  # gone, or not ours to read
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in fds):
                return int(pid)
    return None


# -- the reload after a change of the config --------------------------------------------


@dataclass
class Reloaded:
    """What became of the request to reload after a config change."""

    ok: bool  # reloaded, or no daemon runs (it reads the file at start)
    note: str  # a few words for the command's line
    problem: str | None = None  # the refusal and what to do (stderr), when not ok

    def exit_status(self) -> int:
        """0, or 1 (the problem printed) when the daemon refused to take the change."""
        if self.problem:
            warn(self.problem)
        return 0 if self.ok else 1


def reload_after_edit(args: argparse.Namespace) -> Reloaded:
    """Tell a running daemon to reload; say what happened, and what to do if it refused."""
    from broker.client import BrokerClientError

    nobody = Reloaded(True, "no daemon is running with this config; it will use this at start")
    try:
        broker = connect(args, from_config=True, admin=True)
    except BrokerError:  # no config to find it by, or a key file that cannot be read
        return nobody
    with broker:
        try:
            broker.reload()
        except BrokerClientError as exc:
            if exc.status is None:  # no answer
                return nobody
            why = explain(exc, broker.url, admin=True)
            problem = f"the config is written, but the daemon refused to reload: {why}"
            if exc.status == 400:
                problem += "; it keeps serving its previous config until this is fixed"
            return Reloaded(False, "the running daemon did NOT reload (see the error)", problem)
    return Reloaded(True, "the running daemon reloaded")
