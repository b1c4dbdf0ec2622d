"""Process life: listeners, uvicorn, logging.

The daemon binds its own sockets (TCP on loopback, unix sockets with their
mode and group) and hands them to uvicorn, with proxy-header handling off so
that no request can rewrite its peer address.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import os
import signal
import socket
import ssl as ssl_module
import stat
import sys
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import uvicorn

from broker import connections, systemd
from broker.api import BrokerApp, create_app
from broker.config import ConfigError, Listen, ServerSettings, Settings, TcpListen, UnixListen
from broker.console import Cycler
from broker.errors import BrokerError
from broker.files import state_dir
from broker.logs import Redactor
from broker.manager import APScheduler, Manager
from broker.metrics import RequestCounters
from broker.outputs import Outputs
from broker.providers import issuer_client
from broker.tokens import Clock, rfc3339

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
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("cannot mark the process not dumpable: %s", os.strerror(ctypes.get_errno()))
    # Every connection holds a descriptor: the listeners' caps are shares of this limit.
    connections.raise_fd_limit()


PR_SET_DUMPABLE = 4


def open_listeners(server: ServerSettings) -> list[socket.socket]:
    """Bind every ``listen`` address; raise ConfigError naming the one that failed."""
    return bind(server.listen, server)


def bind(listens: Iterable[Listen], server: ServerSettings) -> list[socket.socket]:
    """Bind ``listens`` (all or none); raise ConfigError naming the one that failed."""
    sockets: list[socket.socket] = []
    try:
        for listen in listens:
            sockets.append(_bind(listen, server))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
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
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Bind owner-only, then widen to socket_mode: no window where others may connect.
        with _umask(0o177):
            sock.bind(path)
        if server.socket_group:
            try:
                gid = grp.getgrnam(server.socket_group).gr_gid
            except KeyError:
                raise ConfigError(
                    f"[server] socket_group: no group named {server.socket_group!r}"
                ) from None
            os.chown(path, -1, gid)
        os.chmod(path, server.socket_mode)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on unix:{path}: {_why(exc)}") from None
    except ConfigError:
        sock.close()
        raise
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
            try:
                st = os.lstat(listen.path)
            except OSError:
                continue
            found.append((listen.path, st.st_dev, st.st_ino))
    return found


def remove_socket_files(files: list[tuple[str, int, int]]) -> None:
    """Unlink the socket files this daemon created (not those systemd passed)."""
    for path, dev, ino in files:
        try:
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == (dev, ino) and stat.S_ISSOCK(st.st_mode):
                os.unlink(path)
        except OSError:
            pass  # already gone, or not ours to remove


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


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _why(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "address already in use (is another token-broker running?)"
    return exc.strerror or str(exc)


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on the loop uvicorn would pick (uvloop when installed).

    ``asyncio.run`` would use the stock selector loop, which serves the hot
    path at about two thirds of uvloop's rate.
    """
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        factory = None
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def uvicorn_config(
    app: object,
    server: ServerSettings | None = None,
    *,
    max_body: int = 0,
    lifespan: str = "on",
) -> uvicorn.Config:
    """uvicorn's settings for one of the broker's servers.

    ``max_body`` > 0: a listener that reads a small form; ``lifespan`` "off" for
    every server but the main one, whose app starts and stops the manager. TLS is
    not uvicorn's to set up: :class:`Server` adds it per listener.
    """
    from broker.protocol import protocol_class

    header_timeout = (server or ServerSettings()).header_timeout
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        http=protocol_class(header_timeout, max_body),  # peer, header deadline and size
        proxy_headers=False,  # never rewrite the peer from X-Forwarded-For (DESIGN §7)
        server_header=False,
        date_header=False,
        access_log=False,
        log_config=None,
        lifespan=lifespan,  # type: ignore[arg-type]
        ws="none",  # no websocket routes: skip importing a websocket implementation (~MBs)
        timeout_graceful_shutdown=1,
    )
    return config


class Https:
    """The HTTPS listeners (DESIGN §10, §12): the IMS-compatible ones and the main API over
    TLS, with one certificate, renewed (local CA) or re-read (user files) in place."""

    def __init__(self, settings: Settings, app: BrokerApp, manager: Manager, limit: int) -> None:
        from broker import tls  # cryptography is loaded only when TLS is configured
        from broker.ims import MAX_FORM, ImsApp

        server = settings.server
        self.cert = tls.ServerCertificate(
            server.tls_cert, server.tls_key, self._hosts(settings),
            leaf_lifetime=server.tls_leaf_lifetime,
        )  # fmt: skip
        app.tls_names = self.names()
        if self.cert.local_ca:
            if self.cert.files.bundle.exists():
                tls.write_bundle(self.cert.files)  # refreshed, should the system CAs change
            if runtime := os.environ.get("RUNTIME_DIRECTORY"):
                # The system unit's state directory is private to the service; the CA
                # certificate and bundle are public: other users find them in /run.
                self.cert.publish(Path(runtime.split(":")[0]))
        self.servers: list[tuple[Server, list[socket.socket]]] = []
        # The certificate's context is handed over, not files: it is renewed in place.
        own: dict[str, Any] = {"counters": app.counters, "limit": limit, "ssl": self.cert.context}
        if server.ims_listen:
            ims = ImsApp(manager, app.counters, time.time)
            config = uvicorn_config(ims, server, max_body=MAX_FORM, lifespan="off")
            self.servers.append((Server(config, **own), bind(server.ims_listen, server)))
        if server.tls_listen:
            config = uvicorn_config(app, server, lifespan="off")
            self.servers.append((Server(config, **own), bind(server.tls_listen, server)))
        self._app = app

    @staticmethod
    def _hosts(settings: Settings) -> list[str]:
        return [t.host for t in (*settings.server.ims_listen, *settings.server.tls_listen)]

    def names(self) -> frozenset[bytes]:
        """The certificate's DNS names: over TLS a rebinding page could not present them."""
        return frozenset(n.lower().encode() for n in self.cert.info.dns_names)

    async def serve(self) -> None:
        for _, sockets in self.servers:
            for sock in sockets:
                log.info("listening on %s (HTTPS)", systemd.listen_name(sock))
        await asyncio.gather(
            self._renewals(), *(srv.serve(sockets=socks) for srv, socks in self.servers)
        )

    async def _renewals(self) -> None:
        from broker.errors import TlsError

        while (when := self.cert.renew_at()) is not None:
            await asyncio.sleep(max(0.0, when - time.time()))
            try:
                info = self.cert.renew()
            except TlsError as exc:
                log.error("TLS: the leaf could not be renewed: %s; trying again in 60s", exc)
                await asyncio.sleep(60)
                continue
            log.info("TLS: new leaf certificate, serial %x, valid until %s",
                     info.serial, rfc3339(info.not_after))  # fmt: skip

    def reloaded(self, settings: Settings) -> None:
        """Read tls_cert/tls_key again (cert-manager renewed them), or re-issue for new hosts."""
        from broker.errors import TlsError

        server = settings.server
        try:
            self.cert.reload(server.tls_cert, server.tls_key, self._hosts(settings))
        except TlsError as exc:
            log.error("reload: TLS certificate not changed: %s", exc)
        self._app.tls_names = self.names()

    def request_exit(self) -> None:
        for srv, _ in self.servers:
            srv.request_exit()


def build(
    settings: Settings,
    *,
    redactor: Redactor,
    clock: Clock = time.time,
    state_directory: Path | None = None,
) -> tuple[BrokerApp, Manager, Outputs]:
    """The ASGI app, its manager, its secret cycling and the file outputs for ``settings``.

    ``redactor`` is the one the log handlers apply (:func:`broker.logs.setup`):
    the manager registers there the secrets and tokens it holds. The cycling
    state lives in ``state_directory`` (default: :func:`broker.files.state_dir`).
    """
    longest = max((c.policy.timeout for c in settings.credentials.values()), default=10.0)
    manager = Manager(
        settings,
        client=issuer_client(longest),
        clock=clock,
        scheduler=APScheduler(),
        redactor=redactor,
    )
    outputs = Outputs(settings.outputs, recorder=manager.recorder, clock=clock)
    cycler = Cycler(manager, state_directory or state_dir(), clock=clock)
    manager.on_token = outputs.refreshed
    manager.on_reload = lambda done: _reloaded(manager, outputs, cycler, done)
    return create_app(manager, clock=clock, cycler=cycler), manager, outputs


def _reloaded(manager: Manager, outputs: Outputs, cycler: Cycler, done: bool) -> None:
    """Tell systemd a reload begins (RELOADING=1 with the monotonic clock) or ended; once
    ended, the file outputs and cycling schedules of the new config are in force."""
    if done:
        outputs.use(manager.settings.outputs, manager.credentials)
        cycler.start()
        systemd.notify("READY=1", f"STATUS={manager.summary()}")
    else:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        systemd.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


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


#: After SIGTERM, requests still waiting on a refresh get 503 token_unavailable this late:
#: before uvicorn's graceful-shutdown deadline (1 s, after its own 0.1 s pause) would cancel
#: them with a bare 500, yet late enough that a token arriving soon is still served.
STOP_WAITING_AFTER = 0.8


async def serve(
    settings: Settings,
    sockets: list[socket.socket],
    *,
    redactor: Redactor,
    hangup_pending: Callable[[], bool] = lambda: False,
    state_directory: Path | None = None,
) -> None:
    """Serve on already-bound ``sockets`` until SIGTERM or SIGINT.

    Under systemd: READY=1 once listening and the first token round has been
    attempted, STATUS= lines, watchdog pings from the event loop (a wedged loop
    stops them and systemd restarts the service), RELOADING=1 around a reload
    and STOPPING=1 at shutdown. ``hangup_pending`` says whether a SIGHUP arrived
    before the loop's handler was installed (see ``cli.run``): that reload runs
    once the daemon is ready.
    """
    app, manager, outputs = build(settings, redactor=redactor, state_directory=state_directory)
    limit = _connection_limit(settings, sockets)
    server = Server(uvicorn_config(app, settings.server), counters=app.counters, limit=limit)
    https = Https(settings, app, manager, limit) if _wants_https(settings) else None
    if https is not None:
        reloaded = manager.on_reload

        def on_reload(done: bool) -> None:
            reloaded(done)
            if done:
                https.reloaded(manager.settings)

        manager.on_reload = on_reload
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _request_exit, server, https, manager, sig)
    tasks: set[asyncio.Task[None]] = set()

    def spawn(coro: Coroutine[Any, Any, None]) -> None:
        task = loop.create_task(coro)
        tasks.add(task)  # keep a reference until it is done
        task.add_done_callback(tasks.discard)

    ready = asyncio.Event()
    hangups: list[bool] = []

    def on_hangup() -> None:
        if ready.is_set():
            spawn(_reload(manager))
        else:  # the manager is still starting: reload once it is ready
            hangups.append(True)

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    for sock in sockets:
        log.info("listening on %s", systemd.listen_name(sock))
    names = list(settings.credentials)
    shown = ", ".join(names[:10]) + (f", … ({len(names)} in all)" if len(names) > 10 else "")
    log.info("credentials: %s", shown or "none")
    spawn(_announce_ready(server, manager, ready, lambda: hangup_pending() or bool(hangups)))
    interval = systemd.watchdog_interval()
    if interval:
        spawn(_watchdog(interval))
    if https is not None:
        spawn(https.serve())
    try:
        await server.serve(sockets=sockets)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        for task in list(tasks):
            task.cancel()
        await outputs.close()


async def _announce_ready(
    server: Server, manager: Manager, ready: asyncio.Event, hangup_pending: Callable[[], bool]
) -> None:
    await server.listening.wait()
    await manager.first_round()
    ready.set()
    systemd.notify("READY=1", f"STATUS={manager.summary()}")
    if hangup_pending():
        await _reload(manager)  # a SIGHUP that came while the daemon was starting


async def _watchdog(interval: float) -> None:
    while True:
        systemd.notify("WATCHDOG=1")
        await asyncio.sleep(interval)


async def _reload(manager: Manager) -> None:
    log.info("SIGHUP received: reloading")
    try:
        await manager.reload_file()
    except BrokerError:
        pass  # already logged by the manager; the running state stays


def _connection_limit(settings: Settings, sockets: list[socket.socket]) -> int:
    """Each listening socket's cap: an equal share of the open-file limit (see
    :func:`broker.connections.connection_limit` for the arithmetic)."""
    count = len(sockets) + len(settings.server.ims_listen) + len(settings.server.tls_listen)
    soft = connections.fd_limit()
    limit = connections.connection_limit(soft, count)
    log.info("connections: at most %d per listener (%d listener(s), open-file limit %d)",
             limit, count, soft)  # fmt: skip
    return limit


def _wants_https(settings: Settings) -> bool:
    return bool(settings.server.ims_listen or settings.server.tls_listen)


def _request_exit(
    server: Server, https: Https | None, manager: Manager, sig: signal.Signals
) -> None:
    log.info("%s received: shutting down", sig.name)
    systemd.notify("STOPPING=1", "STATUS=shutting down")
    server.request_exit()
    if https is not None:
        https.request_exit()
    asyncio.get_running_loop().call_later(STOP_WAITING_AFTER, manager.stop_waiting)
