"""Adobe's I/O Management API: list, add and delete one credential's client secrets.

``GET|POST {console_url}/console/organizations/{console_org_id}/credentials/
{credential_id}/secrets`` and ``DELETE …/secrets/{uuid}``, with a management
token (:data:`broker.providers.adobe.MANAGEMENT_SCOPES`) and ``x-api-key``. Every
answer is read bounded, parsed trusting nothing (times are strings of epoch
milliseconds; a uuid goes into a URL path), and logged with its
``x-request-id``; a failure is a :class:`~broker.errors.CycleError` that quotes
the Console's own error code and message.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass

import httpx

from broker.errors import CycleError, IssuerError
from broker.providers.adobe import AdobeSettings
from broker.tokens import rfc3339
from broker.upstream import HttpReply, json_object, send_bounded, text_field
from broker.upstream import transport_failure as _transport_failure

log = logging.getLogger("broker.cycle")

HOLD_HINT = "is the I/O Management API added to the credential's project in the Developer Console?"
#: What a secret's uuid may look like: it goes into a URL path (no '/', '.', '#', '%').
UUID_RE = re.compile(r"^[A-Za-z0-9_-]{1,100}\Z")  # "$" would let "uuid\n" through
#: Times outside these years are not believed (epoch seconds, 2000 to 2100).
EARLIEST, LATEST = 946_684_800.0, 4_102_444_800.0


@dataclass(frozen=True)
class RemoteSecret:
    """One client secret as the Console lists it: never its value."""

    uuid: str
    created_at: float | None  # epoch seconds
    last_used_at: float | None

    def describe(self) -> str:
        created = rfc3339(self.created_at) or "unknown"
        used = rfc3339(self.last_used_at) or "never"
        return f"{self.uuid} (created {created}, last used {used})"


class Console:
    """GET, POST and DELETE on one credential's secrets, with a management token."""

    def __init__(self, client: httpx.AsyncClient, cred: AdobeSettings, timeout: float) -> None:
        self._client = client
        self._cred = cred
        self.timeout = timeout
        self.url = (
            f"{cred.console_url}/console/organizations/{cred.console_org_id}"
            f"/credentials/{cred.credential_id}/secrets"
        )

    async def list(self, token: str) -> list[RemoteSecret]:
        answer = await self._call("GET", self.url, token)
        body = json_object(answer)
        items = body.get("client_secrets") if body is not None else None
        if answer.status != 200 or not isinstance(items, list):
            raise self._failed("GET", answer)
        found = [_remote(item) for item in items]
        if any(s is None for s in found):
            raise self._failed("GET", answer, "a client_secrets entry without a uuid")
        return [s for s in found if s is not None]

    async def add(self, token: str) -> tuple[RemoteSecret, str]:
        """POST a new secret: (it, its value). The value is shown this one time only."""
        answer = await self._call("POST", self.url, token)
        body = json_object(answer)
        if answer.status not in (200, 201) or body is None:
            raise self._failed("POST", answer)
        remote, value = _remote(body), body.get("client_secret")
        if remote is None or not isinstance(value, str) or not value:
            raise self._failed("POST", answer, "no uuid or client_secret in the answer")
        return remote, value

    async def delete(self, token: str, uuid: str) -> bool:
        """DELETE a secret; False when the Console does not know it (deleted before)."""
        answer = await self._call("DELETE", f"{self.url}/{uuid}", token)
        if answer.status in (200, 204):
            return True
        if answer.status == 404:
            return False
        raise self._failed("DELETE", answer)

    async def _call(self, method: str, url: str, token: str) -> HttpReply:
        headers = {"Authorization": f"Bearer {token}", "x-api-key": self._cred.client_id}
        try:
            async with asyncio.timeout(self.timeout):
                answer = await send_bounded(self._client, method, url, headers)
        except TimeoutError:
            raise CycleError("error", f"Console API {method}: no answer within "
                                      f"{self.timeout:g}s") from None  # fmt: skip
        except httpx.HTTPError as exc:
            raise CycleError("error", f"Console API {method}: "
                                      f"{_transport_failure(exc, url)[1]}") from None  # fmt: skip
        except IssuerError as exc:  # an answer too long to read
            raise CycleError("error", f"Console API {method}: {exc.description}") from None
        log.info(
            "cycle %s: Console API %s secrets: HTTP %d x-request-id=%s",
            self._cred.name,
            method,
            answer.status,
            answer.headers.get("x-request-id", "-"),
            extra={"event": "console_call", "credential": self._cred.name,
                   "status": answer.status, "x_request_id": answer.headers.get("x-request-id")},
        )  # fmt: skip
        return answer

    def _failed(self, method: str, answer: HttpReply, why: str = "") -> CycleError:
        body = json_object(answer) or {}
        code = text_field(body.get("error_code"), 60) or text_field(body.get("error"), 60)
        message = text_field(body.get("message"), 300) or text_field(body.get("detail"), 300)
        text = f"Console API {method} answered HTTP {answer.status}"
        if why:
            text += f" ({why})"
        elif code or message:
            text += f": {code or '-'} {message}".rstrip()
        elif body == {} and answer.body:
            text += " (not JSON)"
        if request_id := answer.headers.get("x-request-id"):
            text += f" (x-request-id {request_id})"
        if answer.status in (401, 403):
            text += f"; {HOLD_HINT}"
        return CycleError("error", text, status=answer.status, request_id=request_id)


def _remote(item: object) -> RemoteSecret | None:
    """A client_secrets entry, trusting nothing in it (times are epoch ms as strings)."""
    if not isinstance(item, dict):
        return None
    uuid = item.get("uuid")
    if not isinstance(uuid, str) or not UUID_RE.match(uuid):
        return None
    usages = item.get("secret_usages")
    used = [_millis(u.get("last_used_at")) for u in usages if isinstance(u, dict)] if (
        isinstance(usages, list)
    ) else []  # fmt: skip
    last_used = max((u for u in used if u is not None), default=None)
    return RemoteSecret(uuid, _millis(item.get("created_at")), last_used)


def _millis(value: object) -> float | None:
    """Epoch milliseconds (a string of digits or a number) as seconds, if believable."""
    if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) <= 16:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, int) and not 0 < value < 10**16:
        return None
    seconds = value / 1000.0
    return seconds if EARLIEST <= seconds <= LATEST else None  # NaN and inf fail too
