from __future__ import annotations

import json
import logging
import socket

import pytest

from broker.errors import IssuerError
from broker.logs import JsonFormatter, Redactor, TextFormatter
from broker.protocol import peer_of


def record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("broker.refresh", logging.WARNING, __file__, 1, msg, args, None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_registered_values_are_replaced_longest_first_and_forgotten_on_drop():
    r = Redactor()
    r.set("secret:a", ("hunter2-secret", "hunter2-secret-longer"))
    r.set("token:a", ("tok-abcdef-123",))
    text = r("x hunter2-secret-longer y hunter2-secret z tok-abcdef-123")
    assert text == "x [redacted] y [redacted] z [redacted]"
    r.drop("token:a")
    assert "tok-abcdef-123" in r("tok-abcdef-123")
    r.set("secret:a", ())
    assert r("hunter2-secret") == "hunter2-secret"


def test_short_values_are_not_registered():
    r = Redactor()
    r.set("secret:s", ("abc",))
    assert r("abcabc") == "abcabc"


@pytest.mark.parametrize(
    "text",
    [
        "Authorization: Bearer eyJhbGciOiJSUzI1NiJ9.payload.sig",
        'body {"access_token": "eyJhbGciOiJSUzI1NiJ9abc"}',
        "form client_secret=p8e-AbCdEfGh&grant_type=client_credentials",
        "refresh_token='zzzzzzzzzz'",
        "client key tbk_AbCdEfGhIjKlMnOpQrStUv",
    ],
)
def test_credential_shapes_are_redacted_even_if_unknown(text):
    out = Redactor()(text)
    assert "[redacted]" in out
    for secret in ("eyJhbGciOiJSUzI1NiJ9", "p8e-AbCdEfGh", "zzzzzzzzzz", "AbCdEfGhIjKl"):
        assert secret not in out


def test_text_and_json_formatters_both_redact():
    r = Redactor()
    r.set("secret:a", ("p8e-very-secret",))
    rec = record("issuer said %s", "p8e-very-secret", credential="a", x_debug_id="dbg1")
    assert TextFormatter(r).format(rec) == "WARNING broker.refresh: issuer said [redacted]"
    line = json.loads(JsonFormatter(r).format(rec))
    assert line["message"] == "issuer said [redacted]"
    assert line["credential"] == "a" and line["x_debug_id"] == "dbg1"
    assert line["level"] == "warning" and line["time"].endswith("Z")
    try:
        raise ValueError("p8e-very-secret in an exception")
    except ValueError:
        import sys

        rec.exc_info = sys.exc_info()
    assert "p8e-very-secret" not in JsonFormatter(r).format(rec)
    assert "p8e-very-secret" not in TextFormatter(r).format(rec)


def test_issuer_errors_scrub_an_echoed_secret():
    err = IssuerError("invalid_request", "cannot parse p8e-echoed-secret", status=400)
    clean = err.scrubbed("p8e-echoed-secret")
    assert "p8e-echoed-secret" not in str(clean) and clean.status == 400
    assert err.scrubbed("abc") is err  # too short to cut without mangling words


def test_peer_of_reads_so_peercred_on_unix_sockets_only():
    import os

    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        peer = peer_of(left)
        assert peer is not None
        assert (peer.pid, peer.uid) == (os.getpid(), os.geteuid())
        assert os.getegid() in peer.gids
    with socket.socket() as tcp:
        assert peer_of(tcp) is None
    assert peer_of(None) is None
