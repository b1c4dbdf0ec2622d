"""The daemon: the one place that builds every part and tells them what happens.

:class:`Daemon` builds the token lifecycle (:class:`~broker.manager.Manager`),
the file outputs, the secret cycling, the apps of every listener and their
HTTPS, hands each the narrow interface it needs, and tells them about start,
reload and new tokens in one written order (docs/architecture.md, "What a
reload touches"). No part patches another's callback or reads another's
private fields. :func:`serve` runs a daemon on already-bound sockets until
SIGTERM, with systemd's notifications, SIGHUP reloads and the watchdog.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from broker import config, connections, systemd
from broker.api import BrokerApp, create_app
from broker.config import Settings
from broker.cycling import Cycler, state_store
from broker.errors import BrokerError, ConfigError, TlsError
from broker.files import state_dir
from broker.logs import Redactor
from broker.manager import Manager
from broker.metrics import Recorder, RequestCounters
from broker.outputs import Outputs
from broker.providers import IssuerClients
from broker.scheduler import APScheduler
from broker.server import Server, bind, uvicorn_config
from broker.stores import Context, SecretRef, VaultRef
from broker.stores.vault import session_for
from broker.tokens import Clock, rfc3339
from broker.upstream import client as issuer_client

log = logging.getLogger("broker.daemon")


class Daemon:
    """Every part of a running broker, built from one configuration.

    ``redactor`` is the one the log handlers apply (:func:`broker.logs.setup`):
    the parts register there the secrets and tokens they hold. The cycling state
    lives in ``state_directory`` (default: :func:`broker.files.state_dir`).
    ``connection_limit``: each listening socket's cap.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        redactor: Redactor,
        clock: Clock = time.time,
        state_directory: Path | None = None,
        connection_limit: int = connections.MAX_PER_LISTENER,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.recorder = Recorder()
        self.counters = RequestCounters()
        self.scheduler = APScheduler()
        longest = max((c.policy.timeout for c in settings.credentials.values()), default=10.0)
        self.issuers = IssuerClients(issuer_client(longest))
        self.vault = (
            session_for(settings.vault, lambda token: redactor.set("vault:token", (token,)))
            if settings.vault is not None
            else None
        )
        self.stores = Context(vault=self.vault)
        self.outputs = Outputs(settings.outputs, recorder=self.recorder, clock=clock)
        self.manager = Manager(
            settings,
            client=self.issuers,
            clock=clock,
            scheduler=self.scheduler,
            recorder=self.recorder,
            redactor=redactor,
            stores=self.stores,
            on_token=self.outputs.refreshed,
        )
        directory = state_directory or state_dir()
        self.cycler = Cycler(
            holder=self.manager,
            issuers=self.issuers,
            scheduler=self.scheduler,
            states=functools.partial(state_store, directory=directory, vault=self.vault),
            clock=clock,
            recorder=self.recorder,
            redactor=redactor,
            stores=self.stores,
        )
        self.app = create_app(
            self.manager,
            clock=clock,
            cycler=self.cycler,
            counters=self.counters,
            reload=self.reload_file,
            vault=self.vault,
        )
        https = settings.server.ims_listen or settings.server.tls_listen
        self.https = Https(settings, self.app, self.manager, connection_limit) if https else None
        self._reloading = asyncio.Lock()
        self._listen = settings.server.listen  # what the sockets were bound to
        self._vault_table = settings.vault  # what the running Vault login was made from
        self._tasks: dict[str, asyncio.Task[None]] = {}  # by what they do: "vault", "follow:NAME"
        self._following: dict[str, SecretRef] = {}

    async def start(self) -> None:
        """Start the scheduler, the first token round (not waited for) and the cycling."""
        _warn_file_modes(self.settings)
        self.scheduler.start()  # inside the running loop (APScheduler 3.11)
        if self.vault is not None:
            self._spawn("vault", self.vault.vault.keep_alive())
        await self.manager.start()
        self._follow_vault()
        await self.cycler.use(self.settings.credentials)

    def _spawn(self, key: str, work: Coroutine[Any, Any, None]) -> None:
        self._tasks[key] = asyncio.get_running_loop().create_task(work, name=key)

    def _follow_vault(self) -> None:
        """Every credential whose secret is in Vault follows its versions and reports the
        one in use (a task each); one no longer configured (or moved) stops."""
        if self.vault is None:
            return  # none was ever started
        wanted = {
            f"follow:{name}": cred.secret
            for name, cred in self.settings.credentials.items()
            if isinstance(cred.secret, VaultRef)
        }
        for key in [k for k in self._tasks if k.startswith("follow:")]:
            if key not in wanted or self._following.get(key) != wanted[key]:
                self._tasks.pop(key).cancel()
        for key, ref in wanted.items():
            if key not in self._tasks:
                self._following[key] = ref
                name = key.removeprefix("follow:")
                self._spawn(key, ref.follow(name, self.vault, self.manager.reread_secrets))

    async def reload_file(self) -> dict[str, list[str]]:
        """Re-read the config file this daemon started from, then :meth:`reload`.

        A config with errors raises ConfigError and changes nothing.
        """
        if (path := self.settings.path) is None:
            raise ConfigError("this daemon was started without a config file: nothing to reload")
        try:
            settings = config.load(path, serving=True)
        except ConfigError as exc:
            log.error("reload refused, the running configuration stays: %s", exc,
                      extra={"event": "reload_refused"})  # fmt: skip
            raise
        _warn_file_modes(settings)
        result = await self.reload(settings)
        if settings.server.listen != self._listen:
            result["restart_needed"] = [str(listen) for listen in settings.server.listen]
            log.warning("reload: listen addresses change only at a restart")
        if settings.vault != self._vault_table:
            result.setdefault("restart_needed", []).append("[vault]")
            log.warning("reload: the [vault] table changes only at a restart; the running "
                        "Vault login stays as it is")  # fmt: skip
        return result

    async def reload(self, settings: Settings) -> dict[str, list[str]]:
        """Put ``settings`` in force, in this order: systemd hears RELOADING=1; the token
        lifecycle (added, removed, changed credentials, secrets read again); the access
        rules of every listener; the TLS certificate; the file outputs; the cycling
        schedules; systemd hears READY=1. One reload at a time (SIGHUP twice)."""
        async with self._reloading:
            usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            systemd.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")
            try:
                plan = await self.manager.reload(settings)
                self.settings = settings
                self.app.use(settings)
                if self.https is not None:
                    self.https.reloaded(settings)
                self.outputs.use(settings.outputs, self.manager.credentials)
                self._follow_vault()
                await self.cycler.use(settings.credentials)
            finally:
                systemd.notify("READY=1", f"STATUS={self.manager.summary()}")
            return plan

    async def close(self) -> None:
        """Stop the scheduler, the refreshes in flight, the outputs' writes; close clients."""
        self.scheduler.shutdown()
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await self.manager.close()
        await self.outputs.close()
        if self.vault is not None:
            await self.vault.vault.aclose()


def _warn_file_modes(settings: Settings) -> None:
    for found in settings.file_modes():
        if found.problem:
            log.warning("%s", found.problem, extra={"event": "file_mode"})


class Https:
    """The HTTPS listeners: the IMS-compatible ones (``ims_listen``) and the main API over
    TLS (``tls_listen``), with one certificate, renewed (local CA) or re-read (user
    files) in place."""

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
        self.ims: ImsApp | None = None
        # The certificate's context is handed over, not files: it is renewed in place.
        own: dict[str, Any] = {"counters": app.counters, "limit": limit, "ssl": self.cert.context}
        if server.ims_listen:
            self.ims = ImsApp(manager, app.counters, time.time, settings)
            config = uvicorn_config(self.ims, server, max_body=MAX_FORM)
            self.servers.append((Server(config, **own), bind(server.ims_listen, server)))
        if server.tls_listen:
            config = uvicorn_config(app, server)
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
        server = settings.server
        try:
            self.cert.reload(server.tls_cert, server.tls_key, self._hosts(settings))
        except TlsError as exc:
            log.error("reload: TLS certificate not changed: %s", exc)
        self._app.tls_names = self.names()
        if self.ims is not None:
            self.ims.use(settings)

    def request_exit(self) -> None:
        for srv, _ in self.servers:
            srv.request_exit()


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
    limit = _connection_limit(settings, sockets)
    daemon = Daemon(
        settings, redactor=redactor, state_directory=state_directory, connection_limit=limit
    )
    server = Server(uvicorn_config(daemon.app, settings.server), counters=daemon.counters,
                    limit=limit)  # fmt: skip
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _request_exit, server, daemon, sig)
    tasks: set[asyncio.Task[None]] = set()

    def spawn(coro: Coroutine[Any, Any, None]) -> None:
        task = loop.create_task(coro)
        tasks.add(task)  # keep a reference until it is done
        task.add_done_callback(tasks.discard)

    ready = asyncio.Event()
    hangups: list[bool] = []

    def on_hangup() -> None:
        if ready.is_set():
            spawn(_reload(daemon))
        else:  # the manager is still starting: reload once it is ready
            hangups.append(True)

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    for sock in sockets:
        log.info("listening on %s", systemd.listen_name(sock))
    names = list(settings.credentials)
    shown = ", ".join(names[:10]) + (f", … ({len(names)} in all)" if len(names) > 10 else "")
    log.info("credentials: %s", shown or "none")
    await daemon.start()
    spawn(_announce_ready(server, daemon, ready, lambda: hangup_pending() or bool(hangups)))
    if interval := systemd.watchdog_interval():
        spawn(_watchdog(interval))
    if daemon.https is not None:
        spawn(daemon.https.serve())
    try:
        await server.serve(sockets=sockets)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        for task in list(tasks):
            task.cancel()
        await daemon.close()


async def _announce_ready(
    server: Server, daemon: Daemon, ready: asyncio.Event, hangup_pending: Callable[[], bool]
) -> None:
    await server.listening.wait()
    await daemon.manager.first_round()
    ready.set()
    systemd.notify("READY=1", f"STATUS={daemon.manager.summary()}")
    if hangup_pending():
        await _reload(daemon)  # a SIGHUP that came while the daemon was starting


async def _watchdog(interval: float) -> None:
    while True:
        systemd.notify("WATCHDOG=1")
        await asyncio.sleep(interval)


async def _reload(daemon: Daemon) -> None:
    log.info("SIGHUP received: reloading")
    with contextlib.suppress(BrokerError):  # already logged; the running state stays
        await daemon.reload_file()


def _connection_limit(settings: Settings, sockets: list[socket.socket]) -> int:
    """Each listening socket's cap: an equal share of the open-file limit (see
    :func:`broker.connections.connection_limit` for the arithmetic)."""
    count = len(sockets) + len(settings.server.ims_listen) + len(settings.server.tls_listen)
    soft = connections.fd_limit()
    limit = connections.connection_limit(soft, count)
    log.info("connections: at most %d per listener (%d listener(s), open-file limit %d)",
             limit, count, soft)  # fmt: skip
    return limit


def _request_exit(server: Server, daemon: Daemon, sig: signal.Signals) -> None:
    log.info("%s received: shutting down", sig.name)
    systemd.notify("STOPPING=1", "STATUS=shutting down")
    server.request_exit()
    if daemon.https is not None:
        daemon.https.request_exit()
    asyncio.get_running_loop().call_later(STOP_WAITING_AFTER, daemon.manager.stop_waiting)
