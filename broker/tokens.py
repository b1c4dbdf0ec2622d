"""Token value object and the refresh policy, as pure functions of ``now``: nothing here
imports FastAPI, httpx or the scheduler, so the lifecycle is tested with an injected clock.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

Clock = Callable[[], float]


@dataclass(frozen=True)
class RefreshPolicy:
    """The ``[refresh]`` keys (docs/configuration.md), durations in seconds."""

    at: float = 0.67
    jitter: float = 0.05
    min_remaining: float = 300.0
    retry_initial: float = 1.0
    retry_max: float = 300.0
    timeout: float = 10.0
    force_cooldown: float = 10.0


@dataclass(frozen=True)
class Token:
    """An access token with its issue and expiry times (epoch seconds)."""

    access_token: str = field(repr=False)
    token_type: str
    issued_at: float
    expires_at: float

    @property
    def lifetime(self) -> float:
        return self.expires_at - self.issued_at

    @property
    def fingerprint(self) -> str:
        """Last 6 hex digits of the token's SHA-256: enough to correlate, useless to steal."""
        return fingerprint(self.access_token)

    def __repr__(self) -> str:
        return f"Token(fingerprint={self.fingerprint}, expires_at={rfc3339(self.expires_at)})"

    def as_json(self, now: float) -> dict[str, object]:
        """``GET /v1/credentials/NAME/token``'s body (and the ``json`` file output's)."""
        return {
            "access_token": self.access_token,
            "token_type": "bearer",
            "expires_in": max(0, math.floor(self.expires_at - now)),  # whole seconds left
            "expires_at": rfc3339(self.expires_at),
        }


def fingerprint(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[-6:]


def min_remaining(token: Token, policy: RefreshPolicy) -> float:
    """Seconds of validity below which a token is no longer served: at most 10% of the
    lifetime, so short-lived tokens stay servable for most of their life."""
    return min(policy.min_remaining, 0.1 * token.lifetime)


def serve_until(token: Token, policy: RefreshPolicy) -> float:
    """The instant after which ``token`` must not be served any more."""
    return token.expires_at - min_remaining(token, policy)


def servable(token: Token | None, now: float, policy: RefreshPolicy) -> bool:
    return token is not None and now < serve_until(token, policy)


def refresh_at(
    token: Token, policy: RefreshPolicy, rand: Callable[[], float] = random.random
) -> float:
    """When the scheduled refresh of ``token`` should run: ``issued_at + at × lifetime ±
    jitter × lifetime``, never later than the moment the token stops being servable."""
    offset = policy.at + policy.jitter * (2 * rand() - 1)
    when = token.issued_at + offset * token.lifetime
    return min(max(when, token.issued_at), serve_until(token, policy))


def retry_delay(
    failures: int,
    policy: RefreshPolicy,
    retry_after: float | None = None,
    rand: Callable[[], float] = random.random,
) -> float:
    """Delay before the next attempt after ``failures`` consecutive failures (>= 1).

    Exponential from ``retry_initial``, capped at ``retry_max``, drawn in [d/2, d) so
    that many brokers do not retry in step. An issuer's ``Retry-After`` is a floor: we
    never come back earlier than it asked.
    """
    exponent = min(max(failures, 1) - 1, 62)  # bound the power, not only the result
    d = min(policy.retry_initial * (2.0**exponent), policy.retry_max)
    return max(d / 2 + rand() * d / 2, retry_after or 0.0)


def rfc3339(epoch: float | None) -> str | None:
    """UTC RFC 3339 with whole seconds, or None."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(int(epoch), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
