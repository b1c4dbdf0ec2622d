"""The IMS-compatible endpoint (docs/ims-endpoint.md): the broker looks like Adobe IMS to tools
that cannot be told to ask a broker (the User Sync Tool, umapi-client scripts).

Only ``POST /ims/token/v2`` and ``/ims/token/v3`` (with or without a trailing
slash) are served, on their own HTTPS listeners; everything else is 404. The
form is IMS's: ``grant_type=client_credentials``, ``client_id``,
``client_secret``, ``scope``. The ``client_id`` picks the credential; the
``client_secret`` must be a broker **client key** allowed to read it (the Adobe
secret itself is refused like any wrong key). The answer comes from the cache,
with single flight: never an issuer call per request. Errors are IMS's own
shape, ``{"error", "error_description"}``.

The same guards as the main listener apply (Host, incl. the listen address;
browsers; proxies; duplicate headers; HTTP/1.x), but not the ``X-Token-Broker``
header (these tools cannot add it: the client key is the proof). The body is a
small form bounded by the protocol (:class:`broker.protocol.FormProtocol`).
"""

from __future__ import annotations

import math
from urllib.parse import parse_qsl

from broker import access, guards
from broker.asgi import Receive, Scope, Send, respond
from broker.config import Settings
from broker.errors import BrokerError, Refused, TokenUnavailable
from broker.manager import Manager
from broker.metrics import RequestCounters
from broker.tokens import Clock

PATHS = frozenset({"/ims/token/v2", "/ims/token/v2/", "/ims/token/v3", "/ims/token/v3/"})
FORM = b"application/x-www-form-urlencoded"
#: The largest form accepted: IMS's four fields fit in a few hundred bytes.
MAX_FORM = 8 * 1024


#: IMS's own answers have this content type.
_IMS_JSON = b"application/json;charset=utf-8"


class ImsError(Refused):
    """A refusal with one of IMS's own error codes (``invalid_client``, ``invalid_scope``...)."""

    def __init__(
        self, status: int, code: str, description: str, rule: str, *, retry_after: int = 0
    ) -> None:
        super().__init__(status, description, rule, code)
        self.retry_after = retry_after

    def http_headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after else {}


class ImsApp:
    """The ASGI app of the IMS-compatible listeners, answering from ``manager``'s cache.

    The key is judged under the settings in force when the answer is made: a request
    whose head came before a reload that removed its key (its form may follow up to
    ``header_timeout`` later, and a token may be waited for) is refused like any other.
    """

    def __init__(
        self, manager: Manager, counters: RequestCounters, clock: Clock, settings: Settings
    ) -> None:
        self.manager = manager
        self.counters = counters
        self.clock = clock
        self.use(settings)

    def use(self, settings: Settings) -> None:
        """Take the settings of a (re)load: their access rules, built once here."""
        self._settings = settings
        self._rules = access.Access(settings)
        self._by_client_id = {c.client_id: n for n, c in settings.credentials.items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no lifespan: the daemon starts and stops what this app reads
        remote = self._settings.server.allow_remote
        refused = guards.refusal(scope, None, remote=remote, own_address=True)
        try:
            if refused is not None:
                raise refused
            body = await self._token(scope, receive)
        except Refused as exc:
            self.counters.rejected[exc.rule] += 1
            answer = {"error": exc.error_code, "error_description": str(exc)}
            await respond(send, exc.http_status, answer, content_type=_IMS_JSON,
                          headers=exc.http_headers())  # fmt: skip
            return
        await respond(send, 200, body, content_type=_IMS_JSON)

    async def _token(self, scope: Scope, receive: Receive) -> dict[str, object]:
        if scope["path"] not in PATHS:
            raise ImsError(404, "not_found", "only POST /ims/token/v2 and /v3 are served here",
                           "ims_path")  # fmt: skip
        if scope["method"] != "POST":
            raise ImsError(405, "invalid_request", "use POST", "ims_form")
        form = await _form(scope, receive)
        if form.get("grant_type") != "client_credentials":
            raise ImsError(400, "unsupported_grant_type",
                           "only grant_type=client_credentials is served", "ims_grant")  # fmt: skip
        settings = self._settings  # the ones _authorized judged by (no await between)
        name = self._authorized(form)
        cred = self.manager.credentials[name].settings
        asked = [s.strip() for s in form.get("scope", "").replace(" ", ",").split(",")]
        if missing := [s for s in asked if s and s not in cred.scopes]:
            raise ImsError(400, "invalid_scope",
                           f"scope not granted to this credential: {', '.join(missing)}",
                           "ims_scope")  # fmt: skip
        if (token := self.manager.cached(name)) is None:
            try:
                token = await self.manager.token(name)
            except TokenUnavailable as exc:
                self.counters.tokens[(name, "unavailable")] += 1
                raise ImsError(503, "temporarily_unavailable", str(exc), "unavailable",
                               retry_after=math.ceil(exc.retry_after)) from None  # fmt: skip
            except BrokerError as exc:  # an unknown name cannot happen: picked above
                raise ImsError(
                    503, "temporarily_unavailable", str(exc), "unavailable", retry_after=1
                ) from None
            if self._settings is not settings:  # reloaded while the token was awaited
                if self._authorized(form) != name:  # its client_id names another now
                    raise _bad_client()
        self.counters.tokens[(name, "ok")] += 1
        # IMS's own three fields, written here: as_json would also format an expires_at
        # (an RFC 3339 date) on every request, only for it to be dropped.
        return {
            "access_token": token.access_token,
            "token_type": "bearer",
            "expires_in": max(0, math.floor(token.expires_at - self.clock())),
        }

    def _authorized(self, form: dict[str, str]) -> str:
        """Raise ImsError unless the form's key may read the credential its client_id
        names, under the settings in force now (the form arrives after the head: a reload
        may have come between); return that name."""
        name = self._by_client_id.get(form.get("client_id", ""))
        key = form.get("client_secret", "").encode()
        client = self._rules.client_of(key) if key else None
        # One answer for an unknown client_id, a wrong key and a key of another client: no
        # probing for names or keys. The Adobe secret is not a client key: refused alike.
        readable = client is not None and (client.credentials is None or name in client.credentials)
        if name is None or not readable:
            raise _bad_client()
        if self.manager.credentials[name].settings.peer_restricted:
            detail = f"{name!r} is served only on the broker's unix socket"
            raise ImsError(401, "invalid_client", detail, "peer")
        return name


def _bad_client() -> ImsError:
    return ImsError(401, "invalid_client", "invalid client_id or client_secret", "bad_key")


async def _form(scope: Scope, receive: Receive) -> dict[str, str]:
    """The request's form fields; a field given twice, or another body, is invalid_request."""
    content_type = b""
    for header, value in scope["headers"]:
        if header == b"content-type":
            content_type = value.split(b";")[0].strip().lower()
    if content_type != FORM:
        detail = "expected an application/x-www-form-urlencoded body"
        raise ImsError(400, "invalid_request", detail, "ims_form")
    body = b""
    while True:  # bounded: the protocol refuses a body over its max_body before it is read
        message = await receive()
        body += message.get("body", b"")
        if len(body) > MAX_FORM:
            raise ImsError(413, "invalid_request", "form too large", "ims_form")
        if not message.get("more_body"):
            break
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise ImsError(400, "invalid_request", "the form is not UTF-8", "ims_form") from None
    form: dict[str, str] = {}
    for key, value in pairs:
        if key in form:
            raise ImsError(400, "invalid_request", f"the field {key!r} is given twice", "ims_form")
        form[key] = value
    return form
