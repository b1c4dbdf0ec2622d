"""umapi-client, driven step by step, in the environment of a User Sync Tool install.

Run by the Python of that environment (a virtualenv with umapi-client 3.0.1 and
token-broker installed together, as a user would: see tests/ust/__init__.py).
It reads one JSON command per line on stdin and answers one JSON line per
command on stdout, so a test can change the world (revoke a token) between
two calls. Commands:

    {"op": "connect", "org": ORG, "endpoint": URL, "auth": "broker", "broker": URL}
    {"op": "connect", "org": ORG, "endpoint": URL, "auth": "s2s", "client_id": ...,
     "client_secret": ..., "auth_host": "127.0.0.1:PORT"}     (UST's own OAuthS2S)
    {"op": "ust_connect", "connector": {...}}   (a connector-umapi.yml, read as UST 2.10 does)
    {"op": "users"} | {"op": "user", "email": E} | {"op": "add_to_group", "email": E,
     "group": G} | {"op": "auth_token"}  (the s2s auth's own token request, once)
    {"op": "quit"}

Answers: {"ok": true, "result": ...} or {"ok": false, "error": TYPE, "message": TEXT}.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def main() -> int:
    import umapi_client

    conn: Any = None
    auth: Any = None
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        try:
            if op == "quit":
                break
            if op == "connect":
                conn = connect(umapi_client, command)
                auth = conn.auth
                result: Any = True
            elif op == "ust_connect":
                conn = ust_connect(umapi_client, command["connector"])
                auth = conn.auth
                result = True
            elif op == "auth_token":  # the auth's own token request, without the retries
                auth.refresh_token()  # that umapi-client wraps around API calls
                result = bool(auth.token)
            elif op == "users":
                result = [u["email"] for u in umapi_client.UsersQuery(conn).all_results()]
            elif op == "user":
                result = umapi_client.UserQuery(conn, command["email"]).result()["email"]
            elif op == "add_to_group":
                action = umapi_client.UserAction(command["email"])
                action.add_to_groups(groups=[command["group"]])
                result = list(conn.execute_single(action, immediate=True))
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as exc:  # the test reads the type and the message
            answer = {"ok": False, "error": type(exc).__name__, "message": str(exc)[:500]}
        else:
            answer = {"ok": True, "result": result}
        print(json.dumps(answer), flush=True)
    return 0


def connect(umapi_client: Any, command: dict[str, Any]) -> Any:
    if command["auth"] == "broker":
        from broker.client import BrokerAuth, TokenBroker

        auth: Any = BrokerAuth(command.get("name"), broker=TokenBroker(command["broker"]))
    else:
        auth = umapi_client.OAuthS2S(
            command["client_id"], command["client_secret"], auth_host=command["auth_host"]
        )
    return umapi_client.Connection(command["org"], auth=auth, endpoint=command["endpoint"])


def ust_connect(umapi_client: Any, options: dict[str, Any]) -> Any:
    """The connection the User Sync Tool 2.10 makes from a ``connector-umapi.yml``.

    These are UST's rules (user_sync/connector/connector_umapi.py and umapi_util.py),
    restated: ``authentication_method`` defaults to ``jwt``, which needs
    ``enterprise.tech_acct_id``; ``oauth`` must not have it, and builds umapi-client's
    ``OAuthS2S`` from ``enterprise.client_id`` and ``client_secret``, posting to
    ``server.auth_host`` (default ``ims-na1.adobelogin.com``) at ``/ims/token/v2``; the
    API is ``https://`` + ``server.host`` + ``server.endpoint``, with 120 s timeouts
    and 3 retries, certificates verified unless ``ssl_cert_verify: false``.
    """
    method = options.get("authentication_method", "jwt")
    server = options.get("server") or {}
    enterprise = options.get("enterprise") or {}
    org_id = enterprise["org_id"]
    tech = enterprise.get("tech_acct_id", enterprise.get("tech_acct"))
    if tech is None and method == "jwt":
        raise ValueError("'tech_acct_id' is required for jwt authentication")
    if tech is not None and method == "oauth":
        raise ValueError("'tech_acct_id' should not be set for oauth authentication")
    if method != "oauth":
        raise ValueError("this stand-in for UST speaks OAuth only (JWT is retired)")
    verify = options.get("ssl_cert_verify", True)
    if server.get("ssl_verify") is not None:
        verify = server["ssl_verify"]
    auth = umapi_client.OAuthS2S(
        client_id=enterprise["client_id"],
        client_secret=enterprise["client_secret"],
        auth_host=server.get("ims_host") or server.get("auth_host", "ims-na1.adobelogin.com"),
        auth_endpoint=server.get("ims_endpoint_jwt")
        or server.get("auth_endpoint", "/ims/token/v2"),
        ssl_verify=verify,
    )
    host = server.get("host", "usermanagement.adobe.io")
    endpoint = "https://" + host + server.get("endpoint", "/v2/usermanagement")
    return umapi_client.Connection(
        org_id=org_id, auth=auth, endpoint=endpoint, user_agent="user-sync/2.10",
        timeout=float(server.get("timeout", 120)), max_retries=server.get("retries", 3),
        ssl_verify=verify,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
