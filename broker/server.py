"""Sockets and uvicorn: what the daemon (:mod:`broker.daemon`) serves on.

The daemon binds its own sockets (TCP on loopback, unix sockets with their
mode and group) and hands them to uvicorn, with proxy-header handling off so
that no request can rewrite its peer address; :class:`Server` is uvicorn
without its signal capture and tick, with a connection cap per listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import os
import socket
import ssl as ssl_module
import stat
import sys
from collections.abc import Coroutine, Iterable, Iterator
from typing import Any, TypeVar

import uvicorn

from broker import connections, systemd
from broker.config import Listen, ServerSettings, TcpListen, UnixListen
from broker.errors import ConfigError
from broker.metrics import RequestCounters

log = logging.getLogger("broker.server")
T = TypeVar("T")


def harden() -> None:
    """No core dumps: a dump of this process would hold every secret and live token.

    RLIMIT_CORE 0 (soft and hard, so nothing in the process can raise it again)
    and not dumpable (PR_SET_DUMPABLE 0: no core even via a pipe handler such as
    systemd-coredump, and other processes of the same user may not ptrace it
    or read its memory through /proc). Under the systemd unit ``LimitCORE=0``
    already holds and setrlimit is filtered, so an unchanged limit is not
    touched.

    Also raises the soft open-file limit to the hard one
    (:func:`broker.connections.raise_fd_limit`), of which each listener gets a share.
    """
    import ctypes
    import resource

    try:
        if resource.getrlimit(resource.RLIMIT_CORE) != (0, 0):
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        log.warning("cannot turn core dumps off (RLIMIT_CORE): %s", exc)
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("cannot mark the process not dumpable: %s", os.strerror(ctypes.get_errno()))
    connections.raise_fd_limit()


PR_SET_DUMPABLE = 4


def open_listeners(server: ServerSettings) -> list[socket.socket]:
    """Bind every ``listen`` address; raise ConfigError naming the one that failed."""
    return bind(server.listen, server)


def bind(listens: Iterable[Listen], server: ServerSettings) -> list[socket.socket]:
    """Bind ``listens`` (all or none); raise ConfigError naming the one that failed."""
    with contextlib.ExitStack() as bound:  # closes those bound so far, should one fail
        sockets = [bound.enter_context(_bind(listen, server)) for listen in listens]
        bound.pop_all()
    return sockets


def _bind(listen: Listen, server: ServerSettings) -> socket.socket:
    if isinstance(listen, TcpListen):
        family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted sockets inherit this: without it, Nagle + delayed ACK add ~40 ms to
        # every keep-alive response that uvicorn writes in two pieces.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind((listen.host, listen.port))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot listen on {listen}: {_why(exc)}") from None
        sock.listen(1024)
        return sock
    return _bind_unix(listen.path, server)


def _bind_unix(path: str, server: ServerSettings) -> socket.socket:
    group = server.socket_group
    try:
        gid = grp.getgrnam(group).gr_gid if group else None
    except KeyError:
        raise ConfigError(f"[server] socket_group: no group named {group!r}") from None
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Bind owner-only, then widen to socket_mode: no window where others may connect.
        umask = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(umask)
        if gid is not None:
            os.chown(path, -1, gid)
        os.chmod(path, server.socket_mode)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on unix:{path}: {_why(exc)}") from None
    sock.listen(1024)
    return sock


def socket_files(server: ServerSettings) -> list[tuple[str, int, int]]:
    """(path, device, inode) of each unix socket file just bound from the config.

    Recorded at start so that :func:`remove_socket_files` removes at exit only the
    files this daemon made, never one a newer daemon bound in their place.
    """
    found = []
    for listen in server.listen:
        if isinstance(listen, UnixListen):
            with contextlib.suppress(OSError):
                st = os.lstat(listen.path)
                found.append((listen.path, st.st_dev, st.st_ino))
    return found


def remove_socket_files(files: list[tuple[str, int, int]]) -> None:
    """Unlink the socket files this daemon created (not those systemd passed)."""
    for path, dev, ino in files:
        with contextlib.suppress(OSError):  # already gone, or not ours to remove
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == (dev, ino) and stat.S_ISSOCK(st.st_mode):
                os.unlink(path)


def _remove_stale_socket(path: str) -> None:
    """Unlink a socket file left by a previous run, but never a live one or a non-socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"cannot listen on unix:{path}: a file that is not a socket is there")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
    else:
        raise ConfigError(f"cannot listen on unix:{path}: another process is listening there")
    finally:
        probe.close()


def _why(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "address already in use (is another token-broker running?)"
    return exc.strerror or str(exc)


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop, the loop uvicorn would pick: ``asyncio.run``'s stock
    selector loop serves the hot path at about two thirds of uvloop's rate."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def uvicorn_config(
    app: object,
    server: ServerSettings | None = None,
    *,
    max_body: int = 0,
    lifespan: str = "off",
) -> uvicorn.Config:
    """uvicorn's settings for one of the broker's servers.

    ``max_body`` > 0: a listener that reads a small form. No lifespan by default: the
    daemon starts and stops what the apps read. TLS is not uvicorn's to set up:
    :class:`Server` adds it per listener.
    """
    from broker.protocol import protocol_class

    header_timeout = (server or ServerSettings()).header_timeout
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        http=protocol_class(header_timeout, max_body),  # peer, header deadline and size
        proxy_headers=False,  # never rewrite the peer from X-Forwarded-For (security model)
        server_header=False,
        date_header=False,
        access_log=False,
        log_config=None,
        lifespan=lifespan,  # type: ignore[arg-type]
        ws="none",  # no websocket routes: skip importing a websocket implementation (~MBs)
        timeout_graceful_shutdown=1,
    )


class Server(uvicorn.Server):
    """uvicorn without its own signal capture and without its 0.1 s tick, and with a
    connection cap and (optionally) TLS per listening socket.

    uvicorn re-raises a captured SIGTERM after shutting down, so the process
    would die "killed by signal"; we stop through :meth:`request_exit` and
    exit 0. Its main loop wakes ten times a second to refresh the Date header
    and check request limits; neither is in use here (``date_header=False``,
    no limit), so an idle broker sleeps until asked to exit.

    With ``counters``, each socket is served through a
    :class:`broker.connections.Listener`: at most ``limit`` connections, and ``ssl``
    (an SSLContext) set up per connection with the handshake bounded by the
    protocol's ``header_timeout``. Without, uvicorn's own startup (the demo issuer).
    """

    _loop: asyncio.AbstractEventLoop | None = None

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        counters: RequestCounters | None = None,
        limit: int = connections.MAX_PER_LISTENER,
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()
        self._counters = counters
        self._limit = limit
        self._ssl = ssl

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if self._counters is None or sockets is None:
            await super().startup(sockets=sockets)
        else:
            await self._startup(sockets, self._counters)
        if self.started:
            self.listening.set()

    async def _startup(self, sockets: list[socket.socket], counters: RequestCounters) -> None:
        """uvicorn's startup for sockets it is handed, with a Listener as each one's
        protocol factory (uvicorn would pass the same factory, and ``ssl``, to all)."""
        from uvicorn.config import STARTUP_FAILURE

        await self.lifespan.startup()
        if self.lifespan.should_exit:
            sys.exit(STARTUP_FAILURE)
        config = self.config
        loop = asyncio.get_running_loop()

        def protocol() -> Any:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state,
                app_state=self.lifespan.state, _loop=loop,
            )  # fmt: skip

        timeout = getattr(config.http_protocol_class, "header_timeout", 10.0)
        self.servers = []
        for sock in sockets:
            listener = connections.Listener(
                systemd.listen_name(sock), self._limit, protocol, counters, loop=loop,
                ssl_context=self._ssl, handshake_timeout=timeout,
            )  # fmt: skip
            self.servers.append(
                await loop.create_server(listener, sock=sock, backlog=config.backlog)
            )
        self.started = True

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def main_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._exit = asyncio.Event()
        if not self.should_exit:
            await self._exit.wait()

    def request_exit(self) -> None:
        """Ask the server to shut down; safe from any thread."""
        self.should_exit = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._exit.set)
