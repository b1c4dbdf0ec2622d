"""Prometheus text exposition of what the broker does.

Written by hand rather than with prometheus_client: a dozen lines of text
do not justify another dependency and its import cost. No label ever holds a
secret, a token or an unbounded value (an unknown credential name is counted
without its name).
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.manager import Manager

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
        out = [
            f'{name}_bucket{{{labels},le="{bound:g}"}} {n}'
            for bound, n in zip(BUCKETS, self.counts, strict=True)
        ]
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.count}')
        out.append(f"{name}_sum{{{labels}}} {self.sum:.6f}")
        out.append(f"{name}_count{{{labels}}} {self.count}")
        return out


class RequestCounters:
    """Counters the HTTP layer bumps on the hot path (plain dict increments)."""

    def __init__(self) -> None:
        self.tokens: Counter[tuple[str, str]] = Counter()
        self.unknown = 0
        self.rejected: Counter[str] = Counter()


def render(manager: Manager, counters: RequestCounters, now: float) -> str:
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")

    family("token_broker_token_requests_total", "counter", "Token requests by outcome.")
    for (cred, outcome), n in sorted(counters.tokens.items()):
        lines.append(
            f'token_broker_token_requests_total{{credential="{cred}",outcome="{outcome}"}} {n}'
        )
    family(
        "token_broker_unknown_credential_requests_total",
        "counter",
        "Token requests for a credential that is not configured.",
    )
    lines.append(f"token_broker_unknown_credential_requests_total {counters.unknown}")
    family("token_broker_rejected_requests_total", "counter", "Requests refused by a guard.")
    for reason, n in sorted(counters.rejected.items()):
        lines.append(f'token_broker_rejected_requests_total{{reason="{reason}"}} {n}')
    family("token_broker_refreshes_total", "counter", "Refresh attempts by outcome.")
    for (cred, outcome), n in sorted(manager.refreshes.items()):
        lines.append(f'token_broker_refreshes_total{{credential="{cred}",outcome="{outcome}"}} {n}')
    family(
        "token_broker_issuer_request_duration_seconds",
        "histogram",
        "Time from sending a token request to the issuer's complete answer (or failure).",
    )
    for name in manager.entries:
        if (histogram := manager.issuer_latency.get(name)) is not None:
            series = "token_broker_issuer_request_duration_seconds"
            lines.extend(histogram.lines(series, f'credential="{name}"'))
    family(
        "token_broker_token_expires_in_seconds", "gauge", "Seconds until the cached token expires."
    )
    for name, entry in manager.entries.items():
        if entry.token is not None:
            left = entry.token.expires_at - now
            lines.append(f'token_broker_token_expires_in_seconds{{credential="{name}"}} {left:.0f}')
    family(
        "token_broker_last_refresh_timestamp_seconds",
        "gauge",
        "Unix time of the last successful refresh.",
    )
    for name, entry in manager.entries.items():
        if entry.refreshed_at is not None:
            lines.append(
                f'token_broker_last_refresh_timestamp_seconds{{credential="{name}"}} '
                f"{entry.refreshed_at:.0f}"
            )
    family("token_broker_credential_state", "gauge", "1 for the current state of a credential.")
    for name, entry in manager.entries.items():
        current = entry.state(now)
        for state in STATES:
            value = 1 if state == current else 0
            lines.append(
                f'token_broker_credential_state{{credential="{name}",state="{state}"}} {value}'
            )
    return "\n".join(lines) + "\n"
