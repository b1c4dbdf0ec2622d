"""The one exception tree of token-broker.

::

    BrokerError                    (its HTTP answer: http_status, error_code, http_headers())
     ├── ConfigError          a config file that cannot be used (names file and key)
     │    ├── TlsError        a CA, certificate or key that cannot be used (names the file)
     │    └── UnsafePath      a directory or file of the daemon's own that others could change
     ├── SecretError          a secret reference that cannot be resolved
     ├── IssuerError          the token issuer refused or failed (retryable, retry_after)
     ├── CycleError           a secret cycle stopped, was undone, or could not run (outcome)
     ├── TokenUnavailable     no servable token right now (retry_after)
     ├── RefreshCooldown      a forced refresh asked for too soon (retry_after)
     ├── RotateCooldown       a secret cycle asked for too soon after the last (retry_after)
     ├── Refused              a request refused by a guard or an access rule (400-505, rule)
     ├── UnknownCredential    no credential of that name
     └── BrokerClientError    broker.client: the running broker could not give what was asked
          ├── BrokerUnavailable   cannot connect, or 503 token_unavailable (retry_after)
          └── BrokerRefused       401 / 403 / 404 (code)

No message in this tree ever carries a secret or a whole token: messages are
built from names, codes and the issuer's own error fields only.

Each class says how the HTTP API answers it (``http_status``, ``error_code``,
:meth:`BrokerError.http_headers`, :meth:`BrokerError.http_body`): the main API
and the IMS-compatible endpoint read those, and nothing else maps an error to a
status.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class BrokerError(Exception):
    """Root of every error token-broker raises on purpose."""

    http_status: int = 500
    error_code: str = "internal_error"  # the answer's "error" field

    def http_headers(self) -> dict[str, str]:
        """Headers the answer to this error carries (Retry-After, WWW-Authenticate)."""
        return {}

    def http_body(self) -> dict[str, object]:
        """The JSON body of the answer: ``{"error": error_code, "detail": sentence}``."""
        return {"error": self.error_code, "detail": str(self)}


class ConfigError(BrokerError):
    """The configuration is missing, malformed or invalid."""

    http_status, error_code = 400, "config_error"


class TlsError(ConfigError):
    """A local CA, leaf, or ``tls_cert`` / ``tls_key`` file cannot be used."""


class UnsafePath(ConfigError):
    """A directory or file of the daemon's own (state, runtime) that another user owns or
    may write, or a symlink where a file of its own should be (names the path and the fix)."""


class SecretError(BrokerError):
    """A secret reference could not be resolved to a secret."""

    http_status, error_code = 502, "secret_unavailable"


@dataclass(frozen=True)
class ErrorInfo:
    """What the status JSON and logs keep of a failed attempt, without secrets."""

    status: int | None
    error: str
    description: str
    debug_id: str | None
    at: float

    def as_json(self) -> dict[str, object]:
        from broker.tokens import rfc3339  # local: keep this module import-free

        return {
            "status": self.status,
            "error": self.error,
            "description": self.description,
            "x_debug_id": self.debug_id,
            "at": rfc3339(self.at),
        }

    def summary(self) -> str:
        """One sentence for logs and error details (a secret's own message, or the issuer's)."""
        if self.status is None and self.error == "secret_unavailable":
            return self.description
        return _issuer_summary(self.status, self.error, self.description, self.debug_id)


#: Values shorter than this are not cut out of text: they would mangle ordinary words, and
#: real secrets and tokens are far longer.
MIN_SECRET_LENGTH = 6
#: What a cut-out secret or token is replaced with, in error texts and log lines alike.
REDACTED = "[redacted]"

#: Issuer error codes that retrying cannot fix: the config or secret must change.
PERMANENT_ERRORS = frozenset({"invalid_client", "unauthorized_client", "invalid_scope"})


class IssuerError(BrokerError):
    """The issuer answered with an error, an unusable answer, or not at all.

    ``status`` is the HTTP status (None when no answer arrived), ``error`` and
    ``description`` the OAuth error fields (or our own code for transport and
    parse failures), ``debug_id`` Adobe's ``x-debug-id`` header.
    """

    http_status, error_code = 502, "issuer_error"

    def __init__(
        self,
        error: str,
        description: str,
        *,
        status: int | None = None,
        debug_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.error = error
        self.description = description
        self.status = status
        self.debug_id = debug_id
        self.retry_after = retry_after
        super().__init__(self.summary())

    def scrubbed(self, secret: str) -> IssuerError:
        """This error with ``secret`` cut out of the issuer's own words (an echoing issuer)."""
        if len(secret) < MIN_SECRET_LENGTH or (
            secret not in self.error and secret not in self.description
        ):
            return self
        return IssuerError(
            self.error.replace(secret, REDACTED),
            self.description.replace(secret, REDACTED),
            status=self.status,
            debug_id=self.debug_id,
            retry_after=self.retry_after,
        )

    @property
    def retryable(self) -> bool:
        """False for errors that only a config or secret change can cure."""
        return self.error not in PERMANENT_ERRORS

    def summary(self) -> str:
        """One sentence quoting status, code, description and x-debug-id."""
        return _issuer_summary(self.status, self.error, self.description, self.debug_id)

    def info(self, at: float) -> ErrorInfo:
        return ErrorInfo(self.status, self.error, self.description, self.debug_id, at)


def _issuer_summary(status: int | None, error: str, description: str, debug_id: str | None) -> str:
    where = f"HTTP {status}" if status is not None else "no answer"
    text = f"issuer error ({where}): {error}"
    if description:
        text += f": {description}"
    if debug_id:
        text += f" (x-debug-id {debug_id})"
    return text


class CycleError(BrokerError):
    """A secret cycle did not complete (docs/architecture.md, "A secret cycle").

    ``outcome`` is a bounded label (the rotations metric): ``conflict`` (two
    secrets at Adobe and the other is not the broker's: nothing was changed),
    ``discarded`` (the new secret never worked at IMS and was deleted again),
    ``busy`` (a cycle of this credential is running), ``error`` (anything else:
    the state is kept and the cycle resumes where it stopped). ``request_id``
    is the I/O Management API's ``x-request-id`` of the answer that failed.
    """

    def __init__(
        self,
        outcome: str,
        detail: str,
        *,
        status: int | None = None,
        request_id: str | None = None,
    ) -> None:
        self.outcome = outcome
        self.status = status
        self.request_id = request_id
        # Per outcome, not per class: nothing changed (409) or the cycle failed (502).
        self.http_status = 409 if outcome in ("conflict", "busy") else 502
        self.error_code = f"cycle_{outcome}"
        super().__init__(detail)

    def http_body(self) -> dict[str, object]:
        return {**super().http_body(), "x_request_id": self.request_id}


class _RetryAfter(BrokerError):
    """An error about credential ``name`` whose answer says when to ask again
    (``retry_after`` seconds)."""

    def __init__(self, name: str, detail: str, *, retry_after: float) -> None:
        self.name = name
        self.retry_after = retry_after
        super().__init__(detail)

    def http_headers(self) -> dict[str, str]:
        return {"Retry-After": str(math.ceil(self.retry_after))}


class TokenUnavailable(_RetryAfter):
    """No servable token exists for a credential at the moment."""

    http_status, error_code = 503, "token_unavailable"

    def __init__(
        self,
        name: str,
        detail: str,
        *,
        retry_after: float,
        last_error: dict[str, object] | None = None,
    ) -> None:
        self.last_error = last_error  # ErrorInfo.as_json() of the last failed attempt
        super().__init__(name, detail, retry_after=retry_after)

    def http_body(self) -> dict[str, object]:
        return {**super().http_body(), "last_error": self.last_error}


class RefreshCooldown(_RetryAfter):
    """A forced refresh came within ``force_cooldown`` or while the issuer's Retry-After runs."""

    http_status, error_code = 429, "refresh_cooldown"

    def __init__(self, name: str, *, retry_after: float) -> None:
        detail = f"credential {name!r} was refreshed moments ago; try again in {retry_after:.0f}s"
        super().__init__(name, detail, retry_after=retry_after)


class RotateCooldown(_RetryAfter):
    """A secret cycle asked for too soon after the last one (each creates and deletes a
    secret at Adobe); ``retry_after``: seconds until one may be asked for again."""

    http_status, error_code = 429, "rotate_cooldown"


class Refused(BrokerError):
    """A request refused by a guard or an access rule, or by the HTTP parser.

    ``http_status`` 400 (``bad_request``, a malformed request), 401
    (``unauthorized``: no or a wrong client key), 403 (``forbidden``), 408, 411,
    413, 431, 505; ``rule`` is a bounded label for the rejected-requests metric.
    """

    def __init__(self, status: int, detail: str, rule: str, code: str | None = None) -> None:
        self.http_status = status
        self.error_code = code or {401: "unauthorized", 403: "forbidden"}.get(status, "bad_request")
        self.rule = rule
        super().__init__(detail)

    def http_headers(self) -> dict[str, str]:
        return (
            {"WWW-Authenticate": 'Bearer realm="token-broker"'} if self.http_status == 401 else {}
        )


class UnknownCredential(BrokerError, LookupError):
    """No credential of that name (or no default credential) is configured."""

    http_status, error_code = 404, "unknown_credential"

    def __init__(self, name: str | None) -> None:
        self.name = name
        if name is None:
            msg = "no default credential: set [server] default or ask for /token/NAME"
        else:
            # The name comes from the request: quote it escaped and bounded.
            shown = name if len(name) <= 64 else name[:64] + "…"
            msg = f"no credential named {shown!r}"
        super().__init__(msg)


def causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or during, innermost last (bounded:
    a chain may loop). Libraries wrap the error a user can act on (httpx wraps ssl's,
    keyring wraps D-Bus's): this is how it is found."""
    found = [exc]
    while len(found) < 10 and (inner := found[-1].__cause__ or found[-1].__context__):
        if inner in found:
            break
        found.append(inner)
    return found
