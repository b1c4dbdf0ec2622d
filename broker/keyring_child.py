"""Read keyring items for the daemon: ``python -m broker.keyring_child``.

Reads ``{"service", "username", "name"}`` as JSON on stdin and writes
``{"secrets": [...]}`` or ``{"error": "..."}`` as JSON on stdout. The secret
travels only through this pipe: never argv, never the environment.
"""

from __future__ import annotations

import json
import sys

from broker.errors import SecretError
from broker.secrets import read_keyring


def main() -> int:
    request = json.load(sys.stdin)
    try:
        found = read_keyring(request["service"], request["username"], request["name"])
    except SecretError as exc:
        json.dump({"error": str(exc)}, sys.stdout)
    else:
        json.dump({"secrets": list(found)}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
