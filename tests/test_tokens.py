from __future__ import annotations

import random

import pytest

from broker.tokens import (
    RefreshPolicy,
    Token,
    fingerprint,
    min_remaining,
    refresh_at,
    retry_delay,
    rfc3339,
    servable,
    serve_until,
)

DAY = 86400.0


def token(issued: float = 1000.0, lifetime: float = DAY) -> Token:
    return Token("secret-token-value", "bearer", issued, issued + lifetime)


def test_refresh_at_stays_within_the_jitter_band():
    policy = RefreshPolicy(at=0.67, jitter=0.05)
    t = token()
    times = [refresh_at(t, policy, random.Random(i).random) for i in range(500)]
    assert min(times) >= t.issued_at + 0.62 * DAY
    assert max(times) <= t.issued_at + 0.72 * DAY
    assert max(times) - min(times) > 0.08 * DAY  # jitter is really drawn


def test_refresh_at_is_never_later_than_serve_until():
    policy = RefreshPolicy(at=0.99, jitter=0.0, min_remaining=3600)
    t = token()
    assert refresh_at(t, policy, lambda: 0.5) == serve_until(t, policy)


def test_min_remaining_is_capped_at_a_tenth_of_the_lifetime():
    policy = RefreshPolicy(min_remaining=300)
    assert min_remaining(token(lifetime=DAY), policy) == 300
    assert min_remaining(token(lifetime=120), policy) == pytest.approx(12)


def test_servable_until_min_remaining_before_expiry():
    policy = RefreshPolicy(min_remaining=300)
    t = token(issued=0)
    assert servable(t, DAY - 301, policy)
    assert not servable(t, DAY - 300, policy)
    assert not servable(None, 0, policy)


@pytest.mark.parametrize("failures", range(1, 15))
def test_retry_delay_doubles_is_half_jittered_and_capped(failures):
    policy = RefreshPolicy(retry_initial=1, retry_max=300)
    d = min(2 ** (failures - 1), 300)
    assert retry_delay(failures, policy, rand=lambda: 0.0) == d / 2
    assert retry_delay(failures, policy, rand=lambda: 0.999999) < d
    assert retry_delay(failures, policy, rand=lambda: 0.999999) > d * 0.99


def test_retry_delay_honours_retry_after_as_a_floor():
    policy = RefreshPolicy(retry_initial=1, retry_max=300)
    assert retry_delay(1, policy, retry_after=120, rand=lambda: 0.5) == 120
    assert retry_delay(20, policy, retry_after=1, rand=lambda: 0.0) == 150


def test_retry_delay_survives_huge_failure_counts():
    assert retry_delay(10_000, RefreshPolicy(retry_max=60), rand=lambda: 0.0) == 30


def test_token_repr_and_fingerprint_hide_the_token():
    t = token()
    assert "secret-token-value" not in repr(t)
    assert t.fingerprint == fingerprint("secret-token-value")
    assert len(t.fingerprint) == 6 and t.fingerprint in repr(t)


def test_rfc3339():
    assert rfc3339(0) == "1970-01-01T00:00:00Z"
    assert rfc3339(1_800_000_000.9) == "2027-01-15T08:00:00Z"
    assert rfc3339(None) is None
