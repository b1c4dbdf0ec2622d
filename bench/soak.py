"""Load and soak: /token under many clients for minutes while the issuer flaps.

Usage: python bench/soak.py [--seconds 120] [--connections 100]

The issuer (in this process) alternates between failing (HTTP 500) and
healthy every --flap seconds, with 30 s tokens, so refreshes keep running
into outages. An outage (3 s) plus the longest retry delay (2 s) is shorter
than the time a token stays servable after its scheduled refresh (~7 s), so
a servable token always exists and errors must be 0.
Also measures restart after kill -9 mid-refresh and SIGTERM with a request in
flight. Talks only to 127.0.0.1; needs wrk.
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import (  # noqa: E402
    reserve_port,
    rss_mb,
    start_broker,
    start_issuer,
    stop,
    wait_http,
    wait_ready,
    write_config,
)

REFRESH = '\n[refresh]\nretry_initial = "0.5s"\nretry_max = "2s"\n'


def soak(args: argparse.Namespace, tmp: Path, rows: list[tuple[str, str]]) -> None:
    issuer = start_issuer(lifetime=30.0)
    port = reserve_port()
    config = write_config(tmp, issuer, port, ["adobe"], "soak-secret")
    config.write_text(config.read_text() + REFRESH)
    broker, _ = start_broker(config, port)
    done = threading.Event()
    outages = 0

    def flap() -> None:
        nonlocal outages
        while not done.wait(args.flap):
            failing = issuer.issuer.mode == "ok"
            issuer.issuer.mode = "error500" if failing else "ok"
            outages += failing

    try:
        wait_ready(port)
        rss_start = rss_mb(broker.pid)
        flapper = threading.Thread(target=flap, daemon=True)
        flapper.start()
        out = subprocess.run(
            ["taskset", "-c", "1", "wrk", "-t1", f"-c{args.connections}",
             f"-d{int(args.seconds)}s", "--latency", "-H", "X-Token-Broker: 1",
             f"http://127.0.0.1:{port}/token"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        done.set()
        rss_end = rss_mb(broker.pid)
        total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
        bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        errors = int(bad.group(1)) if bad else 0
        socket_errors = re.search(r"Socket errors: (.*)", out)

        def pct(p: str) -> str:
            m = re.search(rf"^\s+{p}%\s+(\S+)\s*$", out, re.M)
            return m.group(1) if m else "?"

        successes = len(issuer.issuer.issued)
        rows += [
            (f"requests served in {args.seconds:g} s, {args.connections} connections",
             f"{total} ({total / args.seconds:.0f}/s)"),
            ("non-2xx responses (must be 0: a servable token always existed)", f"{errors}"),
            ("socket errors", socket_errors.group(1) if socket_errors else "none"),
            ("latency p50 / p99", f"{pct('50')} / {pct('99')}"),
            ("issuer outages / calls / tokens issued",
             f"{outages} / {issuer.issuer.calls} / {successes}"),
            ("broker RSS at start / end", f"{rss_start:.1f} MB / {rss_end:.1f} MB"),
        ]  # fmt: skip
    finally:
        done.set()
        stop(broker)
        issuer.stop()


def restart_after_kill(tmp: Path, rows: list[tuple[str, str]]) -> None:
    issuer = start_issuer()
    issuer.issuer.delay = 0.5  # one issuer round trip
    port = reserve_port()
    config = write_config(tmp, issuer, port, ["adobe"], "kill-secret")
    broker = subprocess.Popen([sys.executable, "-m", "broker", "serve", "--config", str(config)],
                              stderr=subprocess.DEVNULL)  # fmt: skip
    while issuer.issuer.calls == 0:
        time.sleep(0.005)
    broker.send_signal(signal.SIGKILL)
    broker.wait()
    started = time.perf_counter()
    again = subprocess.Popen([sys.executable, "-m", "broker", "serve", "--config", str(config)],
                             stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_http(port, "/readyz", 20)
        took = time.perf_counter() - started
        rows.append(("kill -9 mid-refresh: restart to /readyz 200 (issuer takes 0.5 s)",
                     f"{took:.2f} s (target <= 1 s + 0.5 s)"))  # fmt: skip
    finally:
        stop(again)
        issuer.stop()


def sigterm_in_flight(tmp: Path, rows: list[tuple[str, str]]) -> None:
    issuer = start_issuer()
    issuer.issuer.delay = 0.5
    port = reserve_port()
    config = write_config(tmp, issuer, port, ["adobe"], "term-secret")
    broker, _ = start_broker(config, port)
    result: list[int] = []

    def ask() -> None:
        import urllib.request

        req = urllib.request.Request(f"http://127.0.0.1:{port}/token",
                                     headers={"X-Token-Broker": "1"})  # fmt: skip
        result.append(urllib.request.urlopen(req, timeout=10).status)

    asker = threading.Thread(target=ask)
    asker.start()
    time.sleep(0.1)
    started = time.perf_counter()
    broker.send_signal(signal.SIGTERM)
    code = broker.wait(10)
    took = time.perf_counter() - started
    asker.join(10)
    issuer.stop()
    rows.append(("SIGTERM with a request in flight: exit time / exit code / that request",
                 f"{took:.2f} s / {code} / HTTP {result[0] if result else 'none'}"))  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--flap", type=float, default=3.0, help="seconds per issuer state")
    args = parser.parse_args()
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="tb-soak-") as tmp:
        soak(args, Path(tmp), rows)
        restart_after_kill(Path(tmp), rows)
        sigterm_in_flight(Path(tmp), rows)
    width = max(len(r[0]) for r in rows)
    for figure, value in rows:
        print(f"{figure.ljust(width)}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
