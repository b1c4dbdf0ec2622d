"""The ``token-broker`` command: ``main(argv) -> exit code``.

Exit codes: 0 success, 1 failure, 2 usage. Errors go to stderr in one or two
plain sentences, never with a traceback for an expected failure.

Each group of commands has a module of its own (:data:`_COMMANDS`; each module's
docstring says what it holds), imported only when one of its commands runs
(``--help`` and ``serve`` load nothing they do not use).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from broker.errors import BrokerError

if TYPE_CHECKING:
    import argparse

#: Command -> the module (of this package) and function that run it.
_COMMANDS = {
    "serve": ("local", "serve"),
    "demo": ("local", "demo"),
    "token": ("ask", "token"),
    "list": ("ask", "list_credentials"),
    "reload": ("ask", "reload"),
    "health": ("ask", "health"),
    "exec": ("ask", "exec_command"),
    "add": ("setup", "add"),
    "import": ("setup", "import_project"),
    "remove": ("setup", "remove"),
    "rotate": ("setup", "rotate"),
    "client": ("setup", "client"),
    "doctor": ("local", "doctor"),
    "tls": ("local", "tls_command"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit status (argparse exits 2 itself on a usage error)."""
    from broker.cli.parser import build_parser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    command: list[str] | None = None
    if argv[:1] == ["exec"]:  # everything after "--" is the command, never our options
        from broker.execcmd import split_command

        argv, command = split_command(argv)
        if command is None:  # `exec adobe ./script.sh`: the command taken for our arguments
            args, extra = parser.parse_known_args(argv)
            name = f"{args.name} " if args.name else ""
            parser.error(
                f"exec: put the command after --: token-broker exec {name}-- "
                f"{' '.join(extra) or 'COMMAND [ARG...]'}"
            )
    args = parser.parse_args(argv)
    if args.command == "exec":
        if not command:
            parser.error("exec: give the command after --: token-broker exec [NAME] -- COMMAND")
        args.argv = command
    module, function = _COMMANDS[args.command]
    # __import__, the import statement's own path: -X importtime shows the module's cost
    # (importlib.import_module bypasses it).
    run_command = getattr(__import__(f"{__name__}.{module}", fromlist=[function]), function)
    try:
        return int(run_command(args))
    except BrokerError as exc:
        warn(str(exc))
        return 2 if isinstance(exc, Usage) else 1
    except KeyboardInterrupt:
        return 1


class Usage(BrokerError):
    """A command line the parser accepts and the command cannot run (exit status 2)."""


def warn(message: str) -> None:
    """One of the command's sentences on stderr, after the program's name."""
    print(f"token-broker: {message}", file=sys.stderr)


def print_result(args: argparse.Namespace, data: object, text: str) -> None:
    """A command's result on stdout: ``data`` as JSON with ``--json``, else ``text``."""
    import json

    print(json.dumps(data, indent=2) if getattr(args, "json", False) else text)


def run() -> None:
    """Console-script entry point (``token-broker`` and ``python -m broker``)."""
    command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
    if command in ("serve", "demo"):
        # Record SIGHUP from the first instant our code runs, instead of dying of it: the
        # daemon installs its reload handler only once its event loop runs, a few hundred
        # milliseconds later; ``systemctl reload`` right after ``start`` would otherwise
        # kill it. A SIGHUP recorded here triggers one reload once it is ready.
        import signal

        signal.signal(signal.SIGHUP, lambda signum, frame: _hangups.append(signum))
    sys.exit(main())


_hangups: list[int] = []


def hangup_pending() -> bool:
    """Whether a SIGHUP arrived before the daemon could reload (see :func:`run`)."""
    return bool(_hangups)
