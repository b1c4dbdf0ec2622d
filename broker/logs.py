"""Logging: plain lines or JSON lines, and a redaction safety net.

Nothing in token-broker logs a secret or a token on purpose (tokens appear
only as a short fingerprint). The :class:`Redactor` is the net below that:
every line is scrubbed, just before it is written, of

* every configured secret and every live token (registered by the manager
  as it resolves secrets and receives tokens), and
* anything shaped like a credential: ``Bearer …``, ``access_token``,
  ``client_secret`` or ``refresh_token`` values, and client keys (``tbk_…``),

so a secret that reached a message by accident (an issuer that echoes the
request in its error description, an exception text, a third-party logger)
still never reaches the journal.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

from broker.errors import MIN_SECRET_LENGTH, REDACTED

_SHAPES = re.compile(
    r"(?i)(\bbearer\s+)[A-Za-z0-9._~+/=-]{8,}"
    r"|((?:access_token|client_secret|refresh_token)[\"']?\s*[:=]\s*[\"']?)[^\"'&\s,;}]{4,}"
    r"|\btbk_[A-Za-z0-9_-]{8,}"
)
#: Fields of a record's ``extra`` that the JSON format carries (bounded, never secret).
FIELDS = ("event", "credential", "status", "error", "x_debug_id", "expires_at", "attempt")


class Redactor:
    """The values that must never be written, by owner (e.g. ``token:adobe``).

    Setting is O(1), so a refresh of one of a thousand credentials costs
    nothing; scrubbing a line tests each value with ``in`` (lines are rare:
    a few per refresh).
    """

    def __init__(self) -> None:
        self._by_owner: dict[str, tuple[str, ...]] = {}

    def set(self, owner: str, values: tuple[str, ...] | list[str]) -> None:
        if kept := tuple(v for v in values if len(v) >= MIN_SECRET_LENGTH):
            self._by_owner[owner] = kept
        else:
            self._by_owner.pop(owner, None)

    def drop(self, owner: str) -> None:
        self._by_owner.pop(owner, None)

    def __call__(self, text: str) -> str:
        found = [v for values in self._by_owner.values() for v in values if v in text]
        # Longest first, so a secret that contains another is replaced whole.
        for value in sorted(found, key=len, reverse=True):
            text = text.replace(value, REDACTED)
        return _SHAPES.sub(r"\1\2" + REDACTED, text)  # the group that matched, if any, stays


class TextFormatter(logging.Formatter):
    """``LEVEL logger: message``: journald and container runtimes add the time."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for journald (``journalctl -o cat``), Loki and friends."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        redact = self.redact
        line: dict[str, Any] = {
            "time": _rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for key in FIELDS:
            if (value := getattr(record, key, None)) is not None:
                line[key] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            line["exception"] = redact(self.formatException(record.exc_info))
        return redact(json.dumps(line, ensure_ascii=False))


def _rfc3339(when: float) -> str:
    ms = int(when * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{ms:03d}Z"


def setup(redact: Redactor, fmt: str = "text", level: int = logging.INFO) -> None:
    """Send every log record to stderr in ``fmt`` ("text" or "json"), through ``redact``.

    The daemon hands the same redactor to its manager, which registers there the
    secrets and tokens it holds.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(redact) if fmt == "json" else TextFormatter(redact))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn's per-request and lifecycle chatter is not ours to print at INFO.
    for chatty in ("uvicorn.error", "httpx", "apscheduler"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
