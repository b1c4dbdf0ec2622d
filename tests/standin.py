"""A local stand-in for an Adobe API, on a loopback port, for the client tests.

It serves the User Management API routes that umapi-client 3.0.1 calls
(``Connection.query_multiple``, ``query_single``, ``_execute_batch``)::

    GET  {endpoint}/users/{org_id}/{page}                 -> {"result": "success", "users": [...],
                                                              "lastPage": true}
    GET  {endpoint}/organizations/{org_id}/users/{email}  -> {"result": "success", "user": {...}}
    POST {endpoint}/action/{org_id}   (JSON list)          -> {"result": "success", "completed": n,
                                                              "notCompleted": 0, ...}

with ``endpoint`` = ``/v2/usermanagement``. Like the real API it answers 401
unless the request carries a token the issuer handed out, that the test has
not revoked, and the credential's ``x-api-key``. A test "flips" it by
revoking the token the broker serves now.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Container
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from helpers import ServerThread

PREFIX = "/v2/usermanagement"


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    token: str  # the bearer token presented ("" for none)
    status: int
    body: bytes


class StandInApi:
    """The API on 127.0.0.1:<port>, served by a thread per connection."""

    def __init__(self, issued: Callable[[], Container[str]], api_key: str, org_id: str) -> None:
        self.issued = issued
        self.api_key = api_key
        self.org_id = org_id
        self.revoked: set[str] = set()
        self.seen: list[Seen] = []
        self.barrier: threading.Barrier | None = None  # holds every 401 until all have one
        self._lock = threading.Lock()
        # Public: a test may wrap its socket in TLS before start().
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.endpoint = self.url + PREFIX
        self._serving = ServerThread(self.server)

    def start(self) -> StandInApi:
        self._serving.start()
        return self

    def stop(self) -> None:
        self._serving.stop()

    def revoke(self, token: str) -> None:
        """From now on answer 401 to ``token``."""
        self.revoked.add(token)

    def accepted(self) -> list[str]:
        return [s.token for s in self.seen if s.status != 401]

    def refused(self) -> list[str]:
        return [s.token for s in self.seen if s.status == 401]

    def answer(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, object]:
        auth = headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else ""
        ok = (
            token in self.issued()
            and token not in self.revoked
            and headers.get("x-api-key") == self.api_key
        )
        status, reply = (200, self._route(method, path, body)) if ok else (401, _UNAUTHORIZED)
        if status == 200 and reply is None:
            status, reply = 404, {"result": "error", "message": "not a stand-in route"}
        with self._lock:
            self.seen.append(Seen(method, path, token, status, body))
        if status == 401 and self.barrier is not None:
            self.barrier.wait(timeout=30)
        return status, reply

    def _route(self, method: str, path: str, body: bytes) -> object | None:
        path = path.split("?", 1)[0]
        if not path.startswith(PREFIX):
            return None
        parts = path[len(PREFIX) :].strip("/").split("/")
        if method == "GET" and parts[:2] == ["users", self.org_id] and len(parts) == 3:
            users = [{"email": "ada@example.com", "status": "active", "type": "federatedID"}]
            return {"result": "success", "users": users, "lastPage": True}
        if method == "GET" and parts[:3] == ["organizations", self.org_id, "users"]:
            user = {"email": parts[3], "status": "active", "type": "federatedID"}
            return {"result": "success", "user": user}
        if method == "POST" and parts == ["action", self.org_id]:
            actions = json.loads(body)
            assert isinstance(actions, list) and all("do" in a for a in actions), actions
            return {"result": "success", "completed": len(actions), "notCompleted": 0,
                    "completedInTestMode": 0}  # fmt: skip
        return None


_UNAUTHORIZED = {"error_code": "401013", "message": "Oauth token is not valid"}


def _handler(api: StandInApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the real API and the clients' pools

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = b""
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    data += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
                return data
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _serve(self) -> None:
            status, reply = api.answer(self.command, self.path, self.headers, self._body())
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the test reads api.seen instead

    return Handler
