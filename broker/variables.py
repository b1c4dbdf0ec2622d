"""The variables a command or an env file gets for one token (DESIGN §9).

``token-broker exec`` puts them in a command's environment, the ``env`` file
output writes them as ``NAME=value`` lines: one place names them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

FIELDS = ("access_token", "authorization", "expires_at", "api_key", "org_id")
PREFIX = "TOKEN_BROKER_"


@dataclass(frozen=True)
class Taken:
    """One token and what goes with it, as exec and the env output hand it on."""

    name: str
    provider: str
    access_token: str = field(repr=False)
    expires_at: str
    expires_in: float
    client_id: str | None
    org_id: str | None
    extra: dict[str, str]  # static headers beyond the usual three (not secrets)

    def value(self, name: str) -> str:
        """The value of a FIELD; raises LookupError if this credential has none."""
        if name == "access_token":
            return self.access_token
        if name == "authorization":
            return f"Bearer {self.access_token}"
        if name == "expires_at":
            return self.expires_at
        found = self.client_id if name == "api_key" else self.org_id
        if found is None:
            raise LookupError(f"credential {self.name!r} has no {name}")
        return found


def variables(taken: Taken) -> dict[str, str]:
    """``TOKEN_BROKER_ACCESS_TOKEN``, ``..._EXPIRES_AT``; for Adobe ``..._API_KEY`` and
    ``..._ORG_ID`` (when set); each static header as ``TOKEN_BROKER_HEADER_<NAME>``."""
    env = {PREFIX + "ACCESS_TOKEN": taken.access_token, PREFIX + "EXPIRES_AT": taken.expires_at}
    if taken.provider == "adobe":
        env[PREFIX + "API_KEY"] = taken.value("api_key")
        if taken.org_id is not None:
            env[PREFIX + "ORG_ID"] = taken.org_id
    for header, value in taken.extra.items():
        env[header_variable(header)] = value
    return env


def header_variable(header: str) -> str:
    """``x-sandbox-name`` -> ``TOKEN_BROKER_HEADER_X_SANDBOX_NAME``."""
    return PREFIX + "HEADER_" + re.sub(r"[^A-Z0-9]", "_", header.upper())
