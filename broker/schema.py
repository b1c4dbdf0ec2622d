"""What every settings table is built from, and what every credential table has.

The frozen pydantic models of :mod:`broker.config` and of each provider
(:mod:`broker.providers.adobe`, :mod:`broker.providers.oauth2`) share these
parts: durations, the refresh keys, and :class:`CredentialSettings`, the base
of each provider's own settings class, which is the provider (its token
request and API headers). A value is parsed once, here, into the type it is
used as; every default is written once, on its field.
"""

from __future__ import annotations

import os
import re
import ssl
from abc import abstractmethod
from functools import cached_property
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from broker import stores
from broker.stores import SecretRef
from broker.tokens import RefreshPolicy

if TYPE_CHECKING:
    from broker.providers.base import TokenRequest

NAME_RE = re.compile(r"^[A-Za-z0-9._-]+\Z")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*\Z")
_DEFAULT_POLICY = RefreshPolicy()


def parse_duration(value: object) -> float:
    """``"90s"``, ``"5m"``, ``"2h"``, ``"1d"``, ``"250ms"`` or a number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    else:
        raise ValueError('expected a duration such as "90s", "5m" or a number of seconds')
    if seconds < 0:
        raise ValueError("expected a duration of zero or more seconds")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


class KeyProblem(ValueError):
    """A validator's complaint about one key of the table (the loader names the key)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")


class Model(BaseModel):
    """A settings table: unknown keys refused, no type coercion, frozen. Its validators
    see a dict: tables are built by config's _validate, which refuses anything else."""

    model_config = ConfigDict(
        extra="forbid", strict=True, frozen=True, arbitrary_types_allowed=True
    )


def named(data: Any, info: ValidationInfo, key: str = "name") -> Any:
    """The table with the ``key`` the loader fills in: the name it has in the file
    (``[credentials.NAME]``), or its place (an ``[[outputs]]`` index)."""
    if key in data:
        raise KeyProblem(key, "unknown key")
    return {**data, key: (info.context or {})[key]}


class RefreshKeys(Model):
    """The ``[refresh]`` table: defaults any ``[credentials.NAME]`` may override."""

    at: float = Field(_DEFAULT_POLICY.at, gt=0, lt=1)
    jitter: float = Field(_DEFAULT_POLICY.jitter, ge=0, lt=0.5)
    min_remaining: Duration = _DEFAULT_POLICY.min_remaining
    retry_initial: Duration = Field(_DEFAULT_POLICY.retry_initial, gt=0)
    retry_max: Duration = Field(_DEFAULT_POLICY.retry_max, gt=0)
    timeout: Duration = Field(_DEFAULT_POLICY.timeout, gt=0)
    force_cooldown: Duration = _DEFAULT_POLICY.force_cooldown

    @cached_property
    def policy(self) -> RefreshPolicy:
        """These keys as the lifecycle's value object (broker.tokens imports no pydantic)."""
        return RefreshPolicy(**{key: getattr(self, key) for key in RefreshKeys.model_fields})


class CredentialSettings(RefreshKeys):
    """What every ``[credentials.NAME]`` table has; the refresh keys default to [refresh].
    Each provider subclasses it: its own keys, :meth:`token_request`, :meth:`api_headers`."""

    name: str
    provider: str
    client_id: str = Field(min_length=1)
    scopes: tuple[str, ...] = ()
    secret: SecretRef
    # Unix-socket peers allowed to read this credential (SO_PEERCRED); None: no restriction.
    allow_uids: frozenset[Annotated[int, Field(ge=0)]] | None = None
    allow_gids: frozenset[Annotated[int, Field(ge=0)]] | None = None
    ca_file: str | None = None  # a private CA that alone is trusted for this issuer
    #: Static headers some APIs need besides the token's (Experience Platform's
    #: x-sandbox-name, Analytics' x-proxy-global-company-id); not secrets.
    headers: tuple[tuple[str, str], ...] = ()

    @abstractmethod
    def token_request(self, secret: str) -> TokenRequest:
        """The request that asks this credential's issuer for a token with ``secret``."""

    def api_headers(self, access_token: str) -> dict[str, str]:
        """Every header an API call with this token needs (``/v1/credentials/NAME/headers``,
        the ``headers`` and ``env`` file outputs): the token's, then the static ones."""
        return {"Authorization": f"Bearer {access_token}", **dict(self.headers)}

    @property
    def peer_restricted(self) -> bool:
        return self.allow_uids is not None or self.allow_gids is not None

    @property
    def cycles_secret(self) -> bool:
        """Whether the broker writes this credential's secret by itself (secret cycling):
        then the store must be one this process may write."""
        return False

    @field_validator("headers", mode="before")
    @classmethod
    def _headers(cls, value: object) -> object:
        return tuple(check_header(*h) for h in value.items()) if isinstance(value, dict) else value

    @model_validator(mode="before")
    @classmethod
    def _shape(cls, data: Any, info: ValidationInfo) -> Any:
        data = named(data, info)
        for key, value in (info.context or {}).get("refresh", {}).items():
            data.setdefault(key, value)  # [refresh] fills what the table does not set
        for key in ("scopes", "allow_uids", "allow_gids"):
            if isinstance(data.get(key), list):
                data[key] = (tuple if key == "scopes" else frozenset)(data[key])
        if not isinstance(text := data.get("secret", "keyring"), str):
            raise KeyProblem("secret", "expected a string")
        try:
            data["secret"] = stores.parse(text, data["name"])
        except ValueError as exc:
            raise KeyProblem("secret", str(exc)) from None
        if isinstance(data.get("ca_file"), str):
            check_ca_file(data["ca_file"])
        return data


#: Headers a static ``headers`` table may not set: the token's own, the Adobe ones the
#: broker sets, and hop-by-hop or framing headers that belong to each connection.
RESERVED_HEADERS = frozenset(
    {
        "authorization", "x-api-key", "x-gw-ims-org-id", "proxy-authorization", "cookie",
        "host", "connection", "keep-alive", "proxy-connection", "te", "trailer",
        "transfer-encoding", "upgrade", "content-length", "content-type", "expect",
        "x-token-broker",
    }
)  # fmt: skip
_TOKEN_CHARS = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")  # RFC 9110 §5.6.2


def check_header(name: str, value: object) -> tuple[str, str]:
    """One static header, as RFC 9110 allows and the broker leaves to the table."""
    if not isinstance(value, str):
        raise ValueError(f"{name!r}: expected a string value")
    if not _TOKEN_CHARS.match(name):
        raise ValueError(f"{name!r}: not a valid header name")
    if name.lower() in RESERVED_HEADERS:
        raise ValueError(f"{name!r}: set by the broker or per connection, not by a table")
    if not value.isprintable() or value != value.strip():
        raise ValueError(f"{name!r}: the value must be printable, without surrounding spaces")
    return name, value


def check_ca_file(path: str, key: str = "ca_file") -> None:
    """A CA file must be an absolute path to PEM certificates that load."""
    if not os.path.isabs(path):
        raise KeyProblem(key, f"expected an absolute path, got {path!r}")
    try:
        ssl.create_default_context(cafile=path)
    except FileNotFoundError:
        raise KeyProblem(key, f"{path} does not exist") from None
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        raise KeyProblem(key, f"{path} holds no usable PEM certificate ({reason})") from None
