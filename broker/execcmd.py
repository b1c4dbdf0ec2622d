"""``token-broker exec``: run a command with the token in its environment (docs/using-tokens.md).

Everything that can fail (broker down, unknown credential, a field the
credential does not have) happens before the command starts; then this
process *becomes* the command (``execvpe``), as ``aws-vault exec`` does. So
the command has this process's pid, every signal sent to ``token-broker
exec`` (SIGINT, SIGTERM, SIGHUP, any other) is the command's own, and its
exit status, or its death by a signal (a shell shows 128+signo), is exactly
what the caller sees. Nothing of the broker's client survives the exec: the
client key read from a file stays in this process's memory, which is
replaced, and the broker connections are close-on-exec.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from broker.client import KEY_ENV, KEY_FILE_ENV, BrokerClientError, TokenBroker
from broker.variables import FIELDS, TokenExport, variables

_VAR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")  # a variable name sh accepts
#: Token and headers come from two requests; a refresh between them is retried this often.
_ATTEMPTS = 3


class UsageError(ValueError):
    """A malformed option: exit status 2."""


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """Split ``exec ... -- COMMAND ARG...`` at the first ``--`` (None: no ``--``)."""
    args = list(argv)
    if "--" not in args:
        return args, None
    i = args.index("--")
    return args[:i], args[i + 1 :]


def parse_env(items: Sequence[str]) -> list[tuple[str, str]]:
    """``VAR=FIELD`` options as (VAR, FIELD) pairs."""
    pairs = []
    for item in items:
        var, sep, name = item.partition("=")
        if not sep or not _VAR_RE.match(var) or name not in FIELDS:
            raise UsageError(
                f"--env {item!r}: expected VAR=FIELD, FIELD one of {', '.join(FIELDS)}"
            )
        pairs.append((var, name))
    return pairs


def effective_min_remaining(asked: float, status: Mapping[str, Any]) -> float:
    """``asked``, but at most half the token's lifetime (a 120 s token: 60 s)."""
    try:
        issued = datetime.fromisoformat(status["refreshed_at"]).timestamp()
        expires = datetime.fromisoformat(status["expires_at"]).timestamp()
    except (KeyError, TypeError, ValueError):  # no token yet: no times to go by
        return asked
    return min(asked, (expires - issued) / 2) if expires > issued else asked


def take(broker: TokenBroker, name: str | None, min_remaining: float) -> TokenExport:
    """Ask the broker for the token (refreshed first if too little is left) and its headers."""
    status = broker.status(name)
    name = str(status["name"])
    info = broker._token_info(name)
    if float(info.get("expires_in", 0)) < effective_min_remaining(min_remaining, status):
        broker.refresh(name)  # a refresh_cooldown means another just refreshed: take that
        info = broker._token_info(name)
    for _ in range(_ATTEMPTS):
        headers = broker.headers(name)
        if headers.get("Authorization") == f"Bearer {info['access_token']}":
            break
        info = broker._token_info(name)  # a refresh came between the two requests
    else:
        raise LookupError(f"the token of {name!r} kept changing while it was read; try again")
    client_id = status.get("client_id")
    return TokenExport(
        name=name,
        access_token=str(info["access_token"]),
        expires_at=str(info.get("expires_at")),
        expires_in=float(info.get("expires_in", 0)),
        client_id=client_id if isinstance(client_id, str) else None,
        headers=headers,
    )


def environment(
    taken: TokenExport, asked: Sequence[tuple[str, str]], base: Mapping[str, str], *, pass_key: bool
) -> dict[str, str]:
    """The command's environment: ``base`` without the client key, plus the variables.

    Raises LookupError when ``asked`` wants a field the credential does not have.
    """
    hidden = () if pass_key else (KEY_ENV, KEY_FILE_ENV)
    env = {var: value for var, value in base.items() if var not in hidden}
    env.update(variables(taken))
    for var, name in asked:
        try:
            env[var] = taken.value(name)
        except LookupError as exc:
            raise LookupError(f"{exc} (asked for by --env {var}={name})") from None
    return env


def run(
    broker: TokenBroker,
    name: str | None,
    command: Sequence[str],
    *,
    asked: Sequence[tuple[str, str]],
    min_remaining: float,
    pass_key: bool,
) -> int:
    """Replace this process with ``command``; return only when that cannot happen.

    Returns 1 when the token cannot be had (nothing was run), 127 when the command
    does not exist and 126 when it cannot be executed, as a shell does.
    """
    try:
        taken = take(broker, name, min_remaining)
        env = environment(taken, asked, os.environ, pass_key=pass_key)
    except (LookupError, BrokerClientError) as exc:
        print(f"token-broker: {exc}; the command was not run", file=sys.stderr)
        return 1
    finally:
        broker.close()
    sys.stdout.flush()
    sys.stderr.flush()
    # Python ignores SIGPIPE and SIGXFSZ for itself; an ignored signal stays ignored across
    # exec, and `token-broker exec -- yes | head` would then never end.
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    try:
        os.execvpe(command[0], list(command), env)
    except FileNotFoundError:
        print(f"token-broker: {command[0]}: command not found", file=sys.stderr)
        return 127
    except OSError as exc:
        print(f"token-broker: {command[0]}: {exc.strerror}", file=sys.stderr)
        return 126
