"""Keyring operations for the daemon: ``python -m broker.stores.keyring_child``.

Reads one JSON request on stdin: ``{"op", "service", "username", "name"}``
(and ``"secret"`` to store) and writes one JSON answer on stdout, or
``{"error": "..."}``. Operations: ``read`` (the item and its ``#next``
sibling: ``{"secrets": [...]}``), ``get`` (``{"secret": value or null}``),
``set`` and ``delete`` (``{"done": bool}``). A secret travels only through
these pipes: never argv, never the environment.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from broker.errors import SecretError
from broker.stores import keyring


def handle(request: dict[str, Any]) -> dict[str, Any]:
    service, user, name = request["service"], request["username"], request["name"]
    op = request.get("op", "read")
    if op == "read":
        return {"secrets": list(keyring.read(service, user, name))}
    if op == "get":
        return {"secret": keyring.get(service, user, name)}
    if op == "set":
        keyring.store(service, user, request["secret"], name)
        return {"done": True}
    if op == "delete":
        return {"done": keyring.delete(service, user, name)}
    return {"error": f"keyring child: unknown operation {op!r}"}


def main() -> None:
    try:
        answer = handle(json.load(sys.stdin))
    except SecretError as exc:
        answer = {"error": str(exc)}
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    main()
