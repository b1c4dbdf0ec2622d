"""The pure parts of `token-broker exec`: options, variables, the min-remaining cap."""

from __future__ import annotations

import pytest

from broker.execcmd import (
    UsageError,
    effective_min_remaining,
    environment,
    parse_env,
    split_command,
)
from broker.variables import TokenExport, header_variable

ADOBE = TokenExport(
    name="adobe",
    access_token="tok-0123456789",
    expires_at="2030-01-01T00:00:00Z",
    expires_in=3600,
    client_id="cid",
    headers={
        "Authorization": "Bearer tok-0123456789",
        "x-api-key": "cid",
        "x-sandbox-name": "prod",
        "x-proxy-global-company-id": "acme1",
    },
)


def test_split_command_at_the_first_double_dash():
    assert split_command(["exec", "a", "--", "sh", "-c", "x -- y"]) == (
        ["exec", "a"],
        ["sh", "-c", "x -- y"],
    )
    assert split_command(["exec", "a"]) == (["exec", "a"], None)


def test_parse_env():
    assert parse_env(["A=access_token", "_B1=org_id"]) == [("A", "access_token"), ("_B1", "org_id")]
    bad_ones = ("A", "1A=access_token", "A-B=access_token", "A=token", "A=", "=access_token")
    for bad in (*bad_ones, "A\n=access_token"):
        with pytest.raises(UsageError):
            parse_env([bad])


def test_static_headers_become_variables_and_the_key_is_removed():
    base = {"PATH": "/bin", "TOKEN_BROKER_CLIENT_KEY": "k", "TOKEN_BROKER_CLIENT_KEY_FILE": "/f"}
    env = environment(ADOBE, [("H", "authorization")], base, pass_key=False)
    assert env == {
        "PATH": "/bin",
        "TOKEN_BROKER_ACCESS_TOKEN": "tok-0123456789",
        "TOKEN_BROKER_EXPIRES_AT": "2030-01-01T00:00:00Z",
        "TOKEN_BROKER_API_KEY": "cid",  # no TOKEN_BROKER_ORG_ID: this credential has none
        "TOKEN_BROKER_HEADER_X_SANDBOX_NAME": "prod",
        "TOKEN_BROKER_HEADER_X_PROXY_GLOBAL_COMPANY_ID": "acme1",
        "H": "Bearer tok-0123456789",
    }
    kept = environment(ADOBE, [], base, pass_key=True)
    assert kept["TOKEN_BROKER_CLIENT_KEY"] == "k" and kept["TOKEN_BROKER_CLIENT_KEY_FILE"] == "/f"
    with pytest.raises(LookupError, match="no org_id .asked for by --env O=org_id"):
        environment(ADOBE, [("O", "org_id")], base, pass_key=False)
    assert header_variable("X.Odd-Name") == "TOKEN_BROKER_HEADER_X_ODD_NAME"


def test_min_remaining_is_at_most_half_the_lifetime():
    day = {"refreshed_at": "2030-01-01T00:00:00Z", "expires_at": "2030-01-02T00:00:00Z"}
    demo = {"refreshed_at": "2030-01-01T00:00:00Z", "expires_at": "2030-01-01T00:02:00Z"}
    assert effective_min_remaining(600, day) == 600
    assert effective_min_remaining(600, demo) == 60
    assert effective_min_remaining(600, {"refreshed_at": None, "expires_at": None}) == 600
