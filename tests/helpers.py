"""Shared test machinery: a real issuer on loopback, the broker as a process, fakes.

The issuer is :class:`issuer.TestIssuer` (the demo's issuer with the tests' knobs)
served by uvicorn in a thread on a loopback port; tests switch its ``mode`` and
read what it received. The
broker runs as ``python -m broker serve`` with its stderr captured to a file,
which every test searches for the secret and for whole tokens.
"""

from __future__ import annotations

import asyncio
import heapq
import os
import re
import secrets
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import tomlkit
from issuer import TestIssuer, server_for

from broker import config
from broker.demo import loopback_socket

HEADERS = {"X-Token-Broker": "1"}


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns something true; return that, or fail naming ``what``.

    The way tests wait on an event (the issuer saw the call, a line was logged)
    instead of sleeping for a time that assumes it happened.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


#: The sockets that hold the ports of reserve_port(), until release_ports().
_reserved: list[socket.socket] = []


def reserve_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that stays ours until the test ends, for a server to bind.

    The port is held by a socket bound with SO_REUSEADDR that never listens. Linux hands
    such a port to no one else: not to bind(("", 0)), not to connect()'s choice of a local
    port. A server told the number binds it beside the holder (its own listening socket
    sets SO_REUSEADDR, as the broker's, uvicorn's and systemd's do), and binds it again
    after a restart. A port that was bound, closed and handed over as a number could be
    taken in between by any other test or connection (the race of ``-n 4``). Connecting
    to a reserved port that no server listens on is refused: a port known to be down.
    The conftest releases every reservation when the test ends.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind((host, 0))
    _reserved.append(holder)
    return holder.getsockname()[1]


def release_ports() -> None:
    """Give back every port reserve_port() handed out (servers that bound one keep it)."""
    while _reserved:
        _reserved.pop().close()


class IssuerThread:
    """A TestIssuer on 127.0.0.1:<port>, served from a background thread."""

    def __init__(
        self,
        lifetime: float = 3600.0,
        token_bytes: int = 48,
        *,
        certfile: str | None = None,
        keyfile: str | None = None,
    ) -> None:
        self.issuer = TestIssuer(lifetime=lifetime, token_bytes=token_bytes)
        self._sock = loopback_socket()
        self.port = self._sock.getsockname()[1]
        scheme = "https" if certfile else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self._server = server_for(self.issuer, certfile=certfile, keyfile=keyfile)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.run(self._server.serve(sockets=[self._sock]))

    def start(self) -> IssuerThread:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("issuer did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.request_exit()
        self._thread.join(timeout=5)
        self._sock.close()


class ServerThread:
    """A socketserver (http.server's servers included) served from a daemon thread.

    serve_forever() notices shutdown() only when its select() times out: every 0.5 s by
    default, paid at every stop. Here it looks every 10 ms.
    """

    def __init__(self, server: socketserver.BaseServer) -> None:
        self.server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )

    def start(self) -> ServerThread:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


class Repeated:
    """Each ask called again and again, each on a thread of its own, while the ``with``
    block runs: clients under load. ``counts`` has each ask's answers by name (``served``
    their sum); ``failures`` keeps what an ask returned when it was not None (what went
    wrong) or the HTTP error it raised, after the ask's name when it has one."""

    def __init__(
        self, ask: Callable[[], object] | None = None, /, pause: float = 0.0,
        **named: Callable[[], object],
    ) -> None:  # fmt: skip
        self.asks = {"": ask, **named} if ask is not None else named
        self.pause = pause
        self.counts = dict.fromkeys(self.asks, 0)
        self.failures: list[object] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(name,), daemon=True)
                         for name in self.asks]  # fmt: skip

    @property
    def served(self) -> int:
        return sum(self.counts.values())

    def _run(self, name: str) -> None:
        while not self._stop.is_set():
            try:
                problem = self.asks[name]()
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            self.counts[name] += 1
            if problem is not None:
                self.failures.append(f"{name}: {problem}" if name else problem)
            self._stop.wait(self.pause)

    def __enter__(self) -> Repeated:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


def _accepts(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
        return True


class BrokerProcess:
    """``python -m broker serve --config PATH`` with stderr captured to a file."""

    def __init__(
        self, config: Path, *, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
    ) -> None:
        self.config = config
        self.log_path = config.with_suffix(".log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "serve", "--config", str(config), *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def wait_healthy(self, url: str, timeout: float = 15.0, uds: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"broker exited {self.proc.returncode}:\n{self.output()}")
            if uds is not None and not _accepts(uds):
                # httpcore leaks the socket of a failed unix connect: probe it ourselves.
                time.sleep(0.05)
                continue
            try:
                transport = httpx.HTTPTransport(uds=uds)
                with httpx.Client(transport=transport, timeout=1) as client:
                    if client.get(url + "/healthz").status_code == 200:
                        return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"broker not healthy within {timeout}s:\n{self.output()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")


def write_config(path: Path, body: str) -> Path:
    """Write ``body`` as it is: for a test whose subject is the text (comments, bad TOML)."""
    path.write_text(body)
    path.chmod(0o600)
    return path


def config_doc(
    credentials: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    toml: str = "",
    **sections: Any,
) -> dict[str, Any]:
    """A config as the file holds it, from keyword arguments: one way for every test.

    ``credentials`` by name, any other section by its name (``server={...}``,
    ``refresh={...}``, ``clients={...}``, ``outputs=[...]``; None leaves it out), then
    ``toml``: TOML text merged over the rest, table by table, for tests that keep a
    fragment as text.
    """
    doc: dict[str, Any] = {k: v for k, v in sections.items() if v is not None}
    if credentials is not None:
        doc["credentials"] = {name: dict(table) for name, table in credentials.items()}
    return _merged(doc, tomllib.loads(toml)) if toml else doc


def _merged(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merged(dict(out[key]), value)
        else:
            out[key] = value
    return out


def settings(
    credentials: Mapping[str, Mapping[str, Any]] | None = None, *, toml: str = "", **sections: Any
) -> config.Settings:
    """:func:`config_doc` parsed, as the daemon would parse that file."""
    return config.parse(config_doc(credentials, toml=toml, **sections))


def config_file(
    path: Path,
    credentials: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    toml: str = "",
    **sections: Any,
) -> Path:
    """:func:`config_doc` written to ``path`` as TOML, readable by its owner only."""
    return write_config(path, tomlkit.dumps(config_doc(credentials, toml=toml, **sections)))


def metric(url: str, series: str) -> int:
    """The value of one series of the broker's /metrics at ``url`` (0 when absent)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    found = re.search(rf"^{re.escape(series)} (\d+)$", text, re.M)
    return int(found.group(1)) if found else 0


def rotations(url: str, outcome: str = "success") -> int:
    """How many of credential main's secret cycles ended with ``outcome``."""
    return metric(
        url, f'token_broker_secret_rotations_total{{credential="main",outcome="{outcome}"}}'
    )


def new_secret() -> str:
    # Characters that need form-encoding, so that encoding mistakes show up.
    return "s3cr3t+/ :" + secrets.token_hex(16)


@dataclass(frozen=True)
class Fault:
    """One issuer fault of the fault tests (in-process matrix and process cases)."""

    mode: str  # TestIssuer mode, or "gate:refuse" / "gate:garbage" / "gate:reset"
    error: str  # last_error.error the broker reports
    permanent: bool = False
    retry_after: int | None = None  # seconds the issuer asks for
    max_calls: int = 12  # issuer calls in the ~3 s of outage watched


class FakeClock:
    """The one fake clock of the tests: ``now`` is what it says until a test moves it."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        """A sleep that takes no time: the clock moves on by ``seconds`` at once."""
        self.now += seconds


class FakeScheduler:
    """The :class:`broker.manager.Scheduler` interface over a heap, driven by the test."""

    def __init__(self) -> None:
        self.jobs: dict[str, tuple[float, Callable[[str], Awaitable[None]]]] = {}
        self.started = False

    def start(self) -> None:
        self.started = True

    def shutdown(self) -> None:
        self.started = False

    def schedule(self, name: str, when: float, job: Callable[[str], Awaitable[None]]) -> None:
        self.jobs[name] = (when, job)

    def cancel(self, name: str) -> None:
        self.jobs.pop(name, None)

    def next_job(self) -> tuple[float, str] | None:
        heap = [(when, name) for name, (when, _) in self.jobs.items()]
        heapq.heapify(heap)
        return heap[0] if heap else None

    async def run(self, name: str) -> None:
        _, job = self.jobs.pop(name)
        await job(name)


class TcpGate:
    """A loopback port in front of the issuer that forwards, refuses, or answers garbage.

    ``refuse()`` closes the listening socket (connection refused), ``garbage()``
    answers every connection with bytes that are not HTTP, ``forward()`` heals.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = reserve_port()  # refuse() closes the listener; forward() binds it again
        self.url = f"http://127.0.0.1:{self.port}"
        self.mode = "forward"
        self.connections = 0
        self._open: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.base_events.Server | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._call(self._listen())

    def _call(self, coro: Awaitable[object]) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._open.add(writer)
        self._tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        upstream: asyncio.StreamWriter | None = None
        try:
            if self.mode == "garbage":
                await reader.read(65536)
                writer.write(b"\x16\x03\x01\x02\x00 this is not HTTP \xff\xfe\r\n\r\n")
                await writer.drain()
                return
            up_reader, upstream = await asyncio.open_connection("127.0.0.1", self.target_port)
            self._open.add(upstream)

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                dst.close()

            await asyncio.gather(pipe(reader, upstream), pipe(up_reader, writer))
        except (ConnectionError, OSError):
            pass
        finally:
            for w in (writer, upstream):
                if w is not None:
                    self._open.discard(w)
                    w.close()
                    try:
                        await w.wait_closed()
                    except (ConnectionError, OSError):
                        pass

    async def _drop_all(self) -> None:
        """Cut the connections already open: a keep-alive one would bypass the change."""
        for w in list(self._open):
            w.transport.abort()

    def refuse(self) -> None:
        self._call(self._close())
        self._call(self._drop_all())

    def garbage(self) -> None:
        self.mode = "garbage"
        self._call(self._drop_all())

    def forward(self) -> None:
        self.mode = "forward"
        if self._server is None:
            self._call(self._listen())

    async def _shutdown(self) -> None:
        await self._close()
        await self._drop_all()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def stop(self) -> None:
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


def make_ca_and_leaf(
    directory: Path,
    name: str = "test",
    *,
    ips: tuple[str, ...] = ("127.0.0.1",),
    dns: tuple[str, ...] = ("localhost",),
) -> tuple[Path, Path, Path]:
    """A throwaway CA and a leaf it signed for ``ips`` and ``dns``: (ca.pem, leaf.pem, key.pem).

    For tests of issuers behind a private CA (the broker's own local CA is broker.tls).
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)  # noqa: UP017 - cryptography 38 era code

    def build(subject: str, issuer: str, key, signer, *, ca: bool, sans=None):  # type: ignore[no-untyped-def]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = build(f"{name} CA", f"{name} CA", ca_key, ca_key, ca=True)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    leaf = build(ips[0], f"{name} CA", leaf_key, ca_key, ca=False, sans=sans)
    pem = serialization.Encoding.PEM
    paths = directory / f"{name}-ca.pem", directory / f"{name}-leaf.pem", directory / f"{name}.key"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(leaf.public_bytes(pem))
    paths[2].write_bytes(
        leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths[2].chmod(0o600)
    return paths
