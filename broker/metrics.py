"""Prometheus text exposition of what the broker does.

Written by hand rather than with prometheus_client: a dozen lines of text
do not justify another dependency and its import cost. No label ever holds a
secret, a token or an unbounded value (an unknown credential name is counted
without its name).

The manager records into a :class:`Recorder` it is handed; the HTTP layer
counts into :class:`RequestCounters`; :func:`render` turns both, and a
snapshot of each credential's :class:`Gauges`, into text. Nothing here knows
the manager.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sized
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from broker.vault import Health

STATES = ("pending", "fresh", "refreshing", "stale", "expired", "failed")
#: Issuer round trips in seconds: IMS answers in ~0.1-0.5 s; the default timeout is 10 s.
BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """A Prometheus histogram of one series: cumulative bucket counts, sum and count."""

    __slots__ = ("counts", "sum", "count")

    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(BUCKETS):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str, labels: str) -> list[str]:
        buckets = zip(BUCKETS, self.counts, strict=True)
        return [
            *(f'{name}_bucket{{{labels},le="{bound:g}"}} {n}' for bound, n in buckets),
            f'{name}_bucket{{{labels},le="+Inf"}} {self.count}',
            f"{name}_sum{{{labels}}} {self.sum:.6f}",
            f"{name}_count{{{labels}}} {self.count}",
        ]


class Recorder:
    """What the token lifecycle records: refresh outcomes and issuer latency."""

    def __init__(self) -> None:
        self.refreshes: Counter[tuple[str, str]] = Counter()
        self.latency: dict[str, Histogram] = {}
        self.outputs: Counter[tuple[str, str, str]] = Counter()  # (path, write|command, outcome)
        self.rotations: Counter[tuple[str, str]] = Counter()

    def output(self, path: str, kind: str, outcome: str) -> None:
        """A file output was written (kind "write") or its command ran ("command")."""
        self.outputs[(path, kind, outcome)] += 1

    def rotated(self, credential: str, outcome: str) -> None:
        """A secret cycle ended: success, conflict, discarded, busy or error."""
        self.rotations[(credential, outcome)] += 1

    def refreshed(self, credential: str, outcome: str) -> None:
        self.refreshes[(credential, outcome)] += 1

    def issuer_latency(self, credential: str, seconds: float) -> None:
        self.latency.setdefault(credential, Histogram()).observe(seconds)

    def forget(self, credential: str) -> None:
        """A credential removed by a reload: its latency series goes (counters stay)."""
        self.latency.pop(credential, None)


class RequestCounters:
    """Counters the HTTP layer bumps on the hot path (plain dict increments), and what the
    listeners count per connection (:mod:`broker.connections`), by listener address."""

    def __init__(self) -> None:
        self.tokens: Counter[tuple[str, str]] = Counter()
        self.unknown = 0
        self.rejected: Counter[str] = Counter()
        #: Each listener's open connections (its own live collection, read at a scrape).
        self.connections: dict[str, Sized] = {}
        self.connection_limits: dict[str, int] = {}
        self.refused_connections: Counter[str] = Counter()
        self.idle_closed: Counter[str] = Counter()
        self.handshake_failures: Counter[tuple[str, str]] = Counter()  # (listener, reason)


class Gauges(NamedTuple):
    """One credential's current values, as the HTTP layer reads them for a scrape."""

    name: str
    state: str
    expires_in: float | None  # seconds until the cached token expires
    refreshed_at: float | None  # Unix time of the last successful refresh
    secret_age: float | None = None  # seconds since the secret in use was created (cycling)
    secret_version: int | None = None  # the version of a Vault secret in use


def render(
    recorder: Recorder,
    counters: RequestCounters,
    gauges: Iterable[Gauges],
    vault: Health | None = None,
) -> str:
    gauges = list(gauges)
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")

    def by_outcome(name: str, help_text: str, counts: Counter[tuple[str, str]]) -> None:
        """A counter family labelled by credential and outcome."""
        family(name, "counter", help_text)
        for (cred, outcome), n in sorted(counts.items()):
            lines.append(f'{name}{{credential="{cred}",outcome="{outcome}"}} {n}')

    def per_credential(name: str, help_text: str, field: str) -> None:
        """A gauge of each credential's ``field`` (of :class:`Gauges`), where it has one."""
        family(name, "gauge", help_text)
        for g in gauges:
            if (value := getattr(g, field)) is not None:
                lines.append(f'{name}{{credential="{g.name}"}} {value:.0f}')

    def per_listener(
        name: str, kind: str, help_text: str, values: Iterable[tuple[str, int]]
    ) -> None:
        family(name, kind, help_text)
        lines.extend(f'{name}{{listener="{_label(n)}"}} {v}' for n, v in values)

    by_outcome("token_broker_token_requests_total", "Token requests by outcome.", counters.tokens)
    family("token_broker_unknown_credential_requests_total", "counter",
           "Token requests for a credential that is not configured.")  # fmt: skip
    lines.append(f"token_broker_unknown_credential_requests_total {counters.unknown}")
    family("token_broker_rejected_requests_total", "counter", "Requests refused by a guard.")
    for reason, n in sorted(counters.rejected.items()):
        lines.append(f'token_broker_rejected_requests_total{{reason="{reason}"}} {n}')
    # The listeners': open connections and cap, refusals, idle ones closed, TLS handshakes.
    per_listener("token_broker_open_connections", "gauge", "Connections open on a listener.",
                 ((n, len(live)) for n, live in sorted(counters.connections.items())))  # fmt: skip
    per_listener("token_broker_connection_limit", "gauge",
                 "The most connections a listener holds (from the open-file limit).",
                 sorted(counters.connection_limits.items()))  # fmt: skip
    listeners = sorted(counters.connection_limits)  # every listener, from 0 on
    per_listener("token_broker_refused_connections_total", "counter",
                 "Connections refused because the listener held its limit, none idle.",
                 ((n, counters.refused_connections[n]) for n in listeners))  # fmt: skip
    per_listener("token_broker_idle_connections_closed_total", "counter",
                 "Idle keep-alive connections closed to make room at the limit.",
                 ((n, counters.idle_closed[n]) for n in listeners))  # fmt: skip
    family("token_broker_tls_handshake_failures_total", "counter",
           "TLS handshakes that failed, by reason.")  # fmt: skip
    for (name, reason), n in sorted(counters.handshake_failures.items()):
        lines.append(f'token_broker_tls_handshake_failures_total{{listener="{_label(name)}",'
                     f'reason="{reason}"}} {n}')  # fmt: skip
    by_outcome("token_broker_refreshes_total", "Refresh attempts by outcome.", recorder.refreshes)
    series = "token_broker_issuer_request_duration_seconds"
    help_text = "Time from sending a token request to the issuer's complete answer (or failure)."
    family(series, "histogram", help_text)
    for g in gauges:
        if (histogram := recorder.latency.get(g.name)) is not None:
            lines.extend(histogram.lines(series, f'credential="{g.name}"'))
    per_credential("token_broker_token_expires_in_seconds",
                   "Seconds until the cached token expires.", "expires_in")  # fmt: skip
    per_credential("token_broker_last_refresh_timestamp_seconds",
                   "Unix time of the last successful refresh.", "refreshed_at")  # fmt: skip
    for kind, what in (("write", "File output writes"), ("command", "File output commands")):
        series = f"token_broker_output_{kind}s_total"
        family(series, "counter", f"{what} by outcome.")
        for (path, k, outcome), n in sorted(recorder.outputs.items()):
            if k == kind:
                lines.append(f'{series}{{path="{_label(path)}",outcome="{outcome}"}} {n}')
    by_outcome("token_broker_secret_rotations_total", "Secret cycles by outcome.",
               recorder.rotations)  # fmt: skip
    per_credential("token_broker_secret_age_seconds",
                   "Seconds since the client secret in use was created (credentials that cycle).",
                   "secret_age")  # fmt: skip
    family("token_broker_credential_state", "gauge", "1 for the current state of a credential.")
    for g in gauges:
        for state in STATES:
            value = 1 if state == g.state else 0
            lines.append(
                f'token_broker_credential_state{{credential="{g.name}",state="{state}"}} {value}'
            )
    if vault is not None:
        family("token_broker_vault_up", "gauge", "1 when the last call to Vault was answered.")
        lines.append(f"token_broker_vault_up {1 if vault.ok else 0}")
        family("token_broker_vault_failures_total", "counter", "Failed calls to Vault, by reason.")
        for reason, n in sorted(vault.errors.items()):
            lines.append(f'token_broker_vault_failures_total{{reason="{reason}"}} {n}')
        per_credential("token_broker_secret_version", "The version of a Vault secret in use.",
                       "secret_version")  # fmt: skip
    return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    """A label value escaped as the text format wants (paths may hold anything)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
