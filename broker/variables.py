"""The variables a command or an env file gets for one token (docs/using-tokens.md).

``token-broker exec`` puts them in a command's environment, the ``env`` file
output writes them as ``NAME=value`` lines: one place names them.

An env file is read four ways: ``set -a; . FILE`` in sh (dash) or bash,
systemd's ``EnvironmentFile=``, and Docker's ``--env-file``. No one quoting
reads the same in all four: Docker takes everything after the first ``=`` as
it is (up to 28.x quotes included; newer versions drop one pair of matching
quotes, with no escapes), so any quote or backslash written for sh or systemd
becomes part of the value there. Values are therefore written bare, and only
values that all four read back byte for byte are written: letters, digits and
``-._~+/=:@%,`` (every b64token, every RFC 3339 time), not beginning with
``~`` and without ``:~`` (sh expands both to a home directory). Anything else
(a static header with a space or a quote, say) is refused with a sentence
that names the variable; ``env_file`` never guesses a quoting.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

FIELDS = ("access_token", "authorization", "expires_at", "api_key", "org_id")
PREFIX = "TOKEN_BROKER_"


#: The API headers that become variables of their own (the rest: TOKEN_BROKER_HEADER_*).
_OWN = {"x-api-key": PREFIX + "API_KEY", "x-gw-ims-org-id": PREFIX + "ORG_ID"}


@dataclass(frozen=True)
class TokenExport:
    """One token and what goes with it, as exec and the env output hand it on: the token,
    its expiry, and every header an API call with it needs (the provider's and the
    credential's static ones), from which the variables are named."""

    name: str
    access_token: str = field(repr=False)
    expires_at: str
    expires_in: float
    client_id: str | None
    headers: Mapping[str, str] = field(repr=False)  # as /v1/credentials/NAME/headers

    def _header(self, name: str) -> str | None:
        return next((v for k, v in self.headers.items() if k.lower() == name), None)

    def value(self, name: str) -> str:
        """The value of a FIELD; raises LookupError if this credential has none."""
        found = {
            "access_token": self.access_token,
            "authorization": f"Bearer {self.access_token}",
            "expires_at": self.expires_at,
            "api_key": self._header("x-api-key") or self.client_id,
            "org_id": self._header("x-gw-ims-org-id"),
        }[name]
        if found is None:
            raise LookupError(f"credential {self.name!r} has no {name}")
        return found


def variables(export: TokenExport) -> dict[str, str]:
    """``TOKEN_BROKER_ACCESS_TOKEN``, ``..._EXPIRES_AT``; ``..._API_KEY`` and ``..._ORG_ID``
    when the API calls carry them (Adobe's ``x-api-key``, ``x-gw-ims-org-id``); every
    other header but the token's as ``TOKEN_BROKER_HEADER_<NAME>``."""
    env = {PREFIX + "ACCESS_TOKEN": export.access_token, PREFIX + "EXPIRES_AT": export.expires_at}
    for header, value in export.headers.items():
        if header.lower() != "authorization":
            env[_OWN.get(header.lower()) or header_variable(header)] = value
    return env


def header_variable(header: str) -> str:
    """``x-sandbox-name`` -> ``TOKEN_BROKER_HEADER_X_SANDBOX_NAME``."""
    return PREFIX + "HEADER_" + re.sub(r"[^A-Z0-9]", "_", header.upper())


#: What an env file value may hold: characters sh, bash, systemd and Docker all take
#: literally when unquoted (checked against each, character by character, in
#: tests/test_variables.py).
_ENV_VALUE = re.compile(r"[A-Za-z0-9\-._~+/=:@%,]*")
#: Docker reads an env file with Go's bufio.Scanner, which fails on a line of 64 KiB.
_ENV_LINE_MAX = 64 * 1024 - 1


class EnvFileError(ValueError):
    """A value that an env file cannot carry so that every reader reads the same."""


def env_file(env: Mapping[str, str]) -> str:
    """``NAME=value`` lines that sh, bash, systemd and Docker all read as ``env``.

    Raises EnvFileError naming the first variable whose value they would read
    differently; the message never quotes the value (it may be a token).
    """
    lines = []
    for name, value in env.items():
        if (why := _env_value_problem(value)) is not None:
            raise EnvFileError(
                f"{name} {why}, which sh, systemd's EnvironmentFile= and Docker's --env-file "
                "would each read differently (an env file carries only letters, digits and "
                "-._~+/=:@%, unquoted); use the json or headers format for it"
            )
        line = f"{name}={value}"
        if len(line) > _ENV_LINE_MAX:
            raise EnvFileError(f"{name} is longer than a line of Docker's --env-file (64 KiB)")
        lines.append(line + "\n")
    return "".join(lines)


def _env_value_problem(value: str) -> str | None:
    if bad := sorted(set(_ENV_VALUE.sub("", value))):
        return "holds " + ", ".join("a space" if c == " " else repr(c) for c in bad[:5])
    if value.startswith("~") or ":~" in value:
        return "holds a '~' where sh expands it to a home directory"
    return None


def check_env_file(headers: Mapping[str, str]) -> None:
    """Raise EnvFileError if what the config fixes for a credential (the API headers but
    the token's: client_id, org_id, static headers) cannot go in its env file; checked
    once, when the config is read (a token is checked as it arrives: RFC 6750)."""
    env_file(variables(TokenExport("", "t", "2000-01-01T00:00:00Z", 0.0, None, headers)))
