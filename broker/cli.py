"""The ``token-broker`` command: ``main(argv) -> exit code``.

Exit codes: 0 success, 1 failure, 2 usage. Errors go to stderr in one or two
plain sentences, never with a traceback for an expected failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.errors import BrokerError, ConfigError

if TYPE_CHECKING:
    from broker.client import TokenBroker


class _Version(argparse.Action):
    """``--version``, read from the installed metadata only when asked (it costs ~20 ms)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        import broker

        print(f"token-broker {broker.__version__}")  # stdout, as argparse's version does
        parser.exit()


_READ_CONFIG = (
    "the config file (default: $TOKEN_BROKER_CONFIG, else "
    "$XDG_CONFIG_HOME/token-broker/config.toml (~/.config/...) if it exists, "
    "else /etc/token-broker/config.toml)"
)
_WRITE_CONFIG = (
    _READ_CONFIG + "; when none exists it is created: your own (dir 0700, file 0600), or "
    "/etc/token-broker/config.toml when run as root"
)


def _sub(
    sub: Any,
    name: str,
    parents: list[argparse.ArgumentParser],
    summary: str,
    description: str,
    examples: str,
    **kwargs: Any,
) -> argparse.ArgumentParser:
    """A subcommand with a one-line summary, a paragraph of description and examples."""
    import textwrap

    return sub.add_parser(  # type: ignore[no-any-return]
        name,
        parents=parents,
        help=summary,
        description=textwrap.fill(description, width=79),
        epilog="examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **kwargs,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="token-broker",
        description="Serve OAuth access tokens on loopback; the client secret stays here.",
        epilog="Start with `token-broker demo` (no setup), then `token-broker import "
        "project.json` (an Adobe Developer Console download) and `token-broker serve`. "
        "`token-broker COMMAND --help` describes each command, with examples.",
    )
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", metavar="PATH", help=_READ_CONFIG)
    config_write = argparse.ArgumentParser(add_help=False)
    config_write.add_argument("--config", metavar="PATH", help=_WRITE_CONFIG)
    # Only on commands that talk to a running daemon: they send the key with each request.
    key = argparse.ArgumentParser(add_help=False)
    key.add_argument(
        "--key-file",
        metavar="PATH",
        help="a file holding the client key to show the daemon, once it has [clients.NAME] "
        "keys (default: $TOKEN_BROKER_CLIENT_KEY, else the file $TOKEN_BROKER_CLIENT_KEY_FILE "
        "names)",
    )
    daemon = argparse.ArgumentParser(add_help=False)
    daemon.add_argument(
        "--url",
        help="the running daemon: http://HOST:PORT or unix:/path (default: $TOKEN_BROKER_URL, "
        "else the config's first listen address, else http://127.0.0.1:8765)",
    )
    logs = argparse.ArgumentParser(add_help=False)
    logs.add_argument(
        "--log-format", choices=["text", "json"], default="text", help="log lines on stderr"
    )
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _sub(sub, "serve", [config, logs], "run the daemon in the foreground",
         "Run the daemon in the foreground: it reads the config, fetches a token for every "
         "credential, refreshes each ahead of its expiry and serves them on the listen "
         "addresses. It logs to stderr. SIGHUP (or `token-broker reload`) re-reads the "
         "config and the secrets; SIGTERM stops it.",
         "  token-broker serve\n"
         "  token-broker serve --config /etc/token-broker/config.toml\n"
         "  token-broker serve --log-format json\n")  # fmt: skip
    demo = _sub(sub, "demo", [logs], "zero-setup demo: embedded issuer + broker",
                "Start an OAuth issuer of its own on a random loopback port and the broker on "
                "127.0.0.1:8765 with one credential, `demo`, whose tokens live 120 s, so that "
                "you can watch a refresh. It needs no config and writes none; it prints the "
                "commands to try. Ctrl-C stops both.",
                "  token-broker demo\n"
                "  token-broker demo --lifetime 10m --rotate-every 30s\n")  # fmt: skip
    demo.add_argument("--listen", default="127.0.0.1:8765", help="default 127.0.0.1:8765")
    demo.add_argument(
        "--rotate-every",
        metavar="DURATION",
        help="cycle the demo secret this often through the issuer's I/O Management API, "
        'e.g. "30s"',
    )
    demo.add_argument(
        "--lifetime",
        metavar="DURATION",
        default="120s",
        help='the demo tokens\' lifetime, e.g. "90s", "10m" (default 120s)',
    )
    demo.add_argument("--config", help=argparse.SUPPRESS)  # refused with a sentence
    token = _sub(sub, "token", [config, daemon, key], "print a token from the daemon",
                 "Ask the running daemon for a credential's access token and print it alone "
                 "on stdout. Needs no config file: see --url.",
                 "  token-broker token\n"
                 "  TOKEN=$(token-broker token adobe)\n")  # fmt: skip
    token.add_argument("name", nargs="?", help="credential (default: the default credential)")
    lst = _sub(sub, "list", [config, daemon, key], "show each credential's state",
               "Show each credential the daemon serves: provider, state, when its token "
               "expires, and the last error while the credential is not fresh (with cycling, "
               "the secret's age and the next cycle).",
               "  token-broker list\n"
               "  token-broker list --json --url unix:/run/token-broker/broker.sock\n")  # fmt: skip
    lst.add_argument("--json", action="store_true", help="print the status JSON")

    secret_in = argparse.ArgumentParser(add_help=False)
    secret_in.add_argument(
        "--secret-stdin", action="store_true", help="read the secret from stdin (no prompt)"
    )
    secret_in.add_argument(
        "--no-verify", action="store_true", help="skip the test token request to the issuer"
    )
    secret_out = argparse.ArgumentParser(add_help=False)
    secret_out.add_argument(
        "--secret",
        metavar="REF",
        help="where the secret goes, written into the config as `secret = REF`: keyring "
        "(default: the OS keyring), file:PATH (written 0600, its directory made 0700; "
        "for a server without a Secret Service), systemd:NAME (prints the systemd-creds "
        "line to run; for the system service)",
    )
    secret_out.add_argument(
        "--force",
        action="store_true",
        help="replace a secret file or keyring item that holds another secret",
    )
    secret_out.add_argument(
        "--default",
        action="store_true",
        help="make this the [server] default credential, served by GET /token (without it, "
        "an existing single credential stays the default)",
    )
    add = _sub(sub, "add", [config_write, key, json_flag, secret_in, secret_out],
               "add a credential by hand",
               "Add a credential: the secret is prompted for without echo (or read from stdin "
               "with --secret-stdin), verified with one token request, and stored where "
               "--secret says (the OS keyring by default); the config file is created or "
               "edited in place, comments kept, and a running daemon reloads. The config "
               "names the secret's place, never the secret.",
               "  token-broker add adobe --client-id 0123456789abcdef0123456789abcdef \\\n"
               "      --org-id ABCDEF0123456789ABCDEF01@AdobeOrg --scopes openid,AdobeID\n"
               "  printf %s \"$SECRET\" | token-broker add partner --provider oauth2 \\\n"
               "      --client-id broker --token-url https://login.example.com/oauth2/token \\\n"
               "      --secret-stdin --secret file:partner.secret\n")  # fmt: skip
    add.add_argument("name")
    add.add_argument("--client-id", required=True)
    add.add_argument("--provider", choices=["adobe", "oauth2"], default="adobe")
    add.add_argument("--org-id", help="Adobe IMS org, e.g. ABCDEF0123456789ABCDEF01@AdobeOrg")
    add.add_argument("--scopes", help="comma-separated, e.g. openid,AdobeID")
    add.add_argument("--ims-url", help="Adobe IMS base URL (default: production)")
    add.add_argument("--token-url", help="token endpoint (oauth2)")
    add.add_argument("--auth-method", choices=["client_secret_basic", "client_secret_post"])
    imp = _sub(sub, "import", [config_write, key, json_flag, secret_out],
               "import an Adobe Developer Console project JSON",
               "Add every OAuth Server-to-Server credential of a Developer Console project "
               "download (project overview, Download): client id, scopes, IMS org and the "
               "Console ids that secret cycling needs go into the config, the client "
               "secret(s) where --secret says (the OS keyring by default; a second secret "
               "beside the first, as a rotation keeps it). Each is verified with one token "
               "request first. The credential is named after the project (--name chooses). "
               "Afterwards it offers to delete FILE, which holds the secret in plain text.",
               "  token-broker import ~/Downloads/project.json\n"
               "  token-broker import project.json --name adobe --delete \\\n"
               "      --secret file:$HOME/.config/token-broker/adobe.secret\n"
               "  token-broker import project.json --secret systemd:adobe --keep\n")  # fmt: skip
    imp.add_argument("file")
    imp.add_argument("--name", help="credential name (one OAuth Server-to-Server credential)")
    imp.add_argument("--no-verify", action="store_true", help="skip the test token request")
    imp.add_argument("--ims-url", help="Adobe IMS base URL (default: production)")
    keep = imp.add_mutually_exclusive_group()
    keep.add_argument("--delete", action="store_true", help="delete FILE afterwards, no prompt")
    keep.add_argument("--keep", action="store_true", help="keep FILE, no prompt")
    rm = _sub(sub, "remove", [config_write, key, json_flag], "remove a credential",
              "Remove a credential from the config and its keyring items (a file or systemd "
              "secret is left where it is, and named), then reload a running daemon.",
              "  token-broker remove adobe\n")  # fmt: skip
    rm.add_argument("name")
    rot = _sub(sub, "rotate", [config_write, key, json_flag, secret_in],
               "rotate a secret without downtime",
               "Rotate a keyring secret in two steps while every tool keeps getting tokens: "
               "the new secret (made in the Developer Console) is verified and stored beside "
               "the old one; once the old one is deleted at Adobe, --finish keeps only the "
               "new one. --auto instead runs one automatic cycle through Adobe's I/O "
               "Management API (the credential needs credential_id and console_org_id).",
               "  token-broker rotate adobe\n"
               "  token-broker rotate adobe --finish\n"
               "  token-broker rotate adobe --auto\n")  # fmt: skip
    rot.add_argument("name")
    step = rot.add_mutually_exclusive_group()
    step.add_argument("--finish", action="store_true", help="drop the old secret")
    step.add_argument("--abort", action="store_true", help="drop the new secret")
    step.add_argument(
        "--auto",
        action="store_true",
        help="cycle the secret through Adobe's I/O Management API now (by the daemon if one "
        "runs with this config, else here)",
    )
    _sub(sub, "reload", [config, daemon, key, json_flag],
         "make the daemon re-read config and secrets",
         "Ask the running daemon to re-read its config file and secrets, as SIGHUP does: "
         "added credentials start, removed ones stop, changed ones refresh, the others keep "
         "their tokens. A config with an error is refused whole. With client keys it needs a "
         'key whose credentials are "*" -- except from root or the daemon\'s own user over '
         "its unix socket.",
         "  token-broker reload\n"
         "  token-broker reload --key-file /etc/token-broker/admin.key\n")  # fmt: skip
    health = _sub(sub, "health", [config, daemon, key],
                  "exit 0 if the daemon is healthy (container probes)",
                  "Exit 0 if the daemon answers /healthz (with --ready: /readyz, every "
                  "credential has a servable token), else 1 with the reason on stderr.",
                  "  token-broker health --ready\n")  # fmt: skip
    health.add_argument("--ready", action="store_true", help="ask /readyz instead of /healthz")
    _exec_parser(sub, [config, daemon, key])
    doc = _sub(sub, "doctor", [config, json_flag], "check the setup",
               "Check the setup, one line per check: the config file, file modes, the "
               "keyring, listen addresses, TLS files, every credential's secret and, unless "
               "--offline, one token request per credential. Exit 1 when a check fails.",
               "  token-broker doctor\n"
               "  token-broker doctor --offline --json\n")  # fmt: skip
    doc.add_argument("--offline", action="store_true", help="no token requests to issuers")

    client = _sub(sub, "client", [], "client keys: who may read which token",
                  "Client keys let each tool read only its own credentials. Once one exists, "
                  "every token and status request needs `Authorization: Bearer KEY`.",
                  "  token-broker client add ci --credentials adobe > ci.key\n"
                  "  token-broker client list\n")  # fmt: skip
    client_sub = client.add_subparsers(dest="client_command", required=True, metavar="ACTION")
    cadd = _sub(client_sub, "add", [config_write, key, json_flag],
                "create a client key (printed once)",
                "Create a client key allowed to read the named credentials and print it, "
                "alone on stdout, once: the config keeps only its SHA-256. Adding the first "
                "client makes every other reader need a key too.",
                "  (umask 077; token-broker client add ci --credentials adobe > ci.key)\n"
                "  token-broker client add ops --credentials '*'\n")  # fmt: skip
    cadd.add_argument("name")
    cadd.add_argument(
        "--credentials", required=True, help='comma-separated credential names, or "*" for all'
    )
    cadd.add_argument("--replace", action="store_true", help="give an existing client a new key")
    crm = _sub(client_sub, "remove", [config_write, key, json_flag], "remove a client",
               "Remove a client from the config: its key stops working once the daemon has "
               "reloaded (this command asks it to).",
               "  token-broker client remove ci\n")  # fmt: skip
    crm.add_argument("name")
    _sub(client_sub, "list", [config, json_flag], "show the clients",
         "Show each client and the credentials its key may read, from the config (the keys "
         "themselves are not kept anywhere: only their SHA-256).",
         "  token-broker client list --json\n")  # fmt: skip

    # -- tls: the local CA of the HTTPS listener; the logic is in broker/tls.py
    tls = _sub(sub, "tls", [], "the local CA of the HTTPS (IMS) listener",
               "The local CA that signs the certificate of the HTTPS listeners (ims_listen, "
               "tls_listen): create it, and print the files clients must trust.",
               "  token-broker tls init\n"
               "  token-broker tls ca --bundle\n")  # fmt: skip
    tls_sub = tls.add_subparsers(dest="tls_command", required=True, metavar="ACTION")
    _sub(tls_sub, "init", [config], "create the local CA (once)",
         "Create the local CA (an ECDSA key, mode 0600, and a certificate limited to "
         "loopback names) in the state directory; an existing one is left alone.",
         "  token-broker tls init\n")  # fmt: skip
    tls_ca = _sub(tls_sub, "ca", [config], "print the CA certificate's path",
                  "Print the path of the local CA's certificate alone on stdout (with "
                  "--bundle: of a bundle of the system's CAs plus the broker's).",
                  "  export REQUESTS_CA_BUNDLE=$(token-broker tls ca --bundle)\n")  # fmt: skip
    tls_ca.add_argument(
        "--bundle",
        action="store_true",
        help="print instead the path of a bundle of the system's CAs plus the broker's "
        "(for REQUESTS_CA_BUNDLE, which replaces requests' trust store)",
    )
    return parser


def _exec_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    ex = _sub(sub, "exec", parents, "run a command with the token in its environment",
              "Run COMMAND with a credential's token in its environment "
              "(TOKEN_BROKER_ACCESS_TOKEN, TOKEN_BROKER_EXPIRES_AT and, for Adobe, "
              "TOKEN_BROKER_API_KEY and TOKEN_BROKER_ORG_ID), as `aws-vault exec` does. The "
              "command goes after `--`. It becomes this process: same pid, its signals and "
              "its exit status.",
              "  token-broker exec adobe -- ./sync-users.sh\n"
              "  token-broker exec --env AUTH=authorization -- my-tool --verbose\n",
              usage="token-broker exec [NAME] [--env VAR=FIELD]... [--min-remaining DUR] "
              "[--pass-key] [--url URL] -- COMMAND [ARG...]")  # fmt: skip
    ex.add_argument("name", nargs="?", help="credential (default: the default credential)")
    ex.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="VAR=FIELD",
        help="also set VAR to FIELD: access_token, authorization, expires_at, api_key, org_id",
    )
    ex.add_argument(
        "--min-remaining",
        default="10m",
        metavar="DUR",
        help="refresh first if the token has less left (default 10m, at most half its lifetime)",
    )
    ex.add_argument(
        "--pass-key",
        action="store_true",
        help="leave $TOKEN_BROKER_CLIENT_KEY(_FILE) in the command's environment",
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] | None = None
    if argv[:1] == ["exec"]:  # everything after "--" is the command, never our options
        from broker.execcmd import split_command

        argv, command = split_command(argv)
    parser = _parser()
    if argv[:1] == ["exec"] and command is None:
        args, extra = parser.parse_known_args(argv)
        if extra or not command:
            # `exec adobe ./script.sh`: the command was taken for our own arguments.
            name = f"{args.name} " if args.name else ""
            given = " ".join(extra)
            parser.error(
                f"exec: put the command after --: token-broker exec {name}-- "
                f"{given or 'COMMAND [ARG...]'}"
            )
    args = parser.parse_args(argv)
    if args.command == "exec":
        if not command:
            parser.error("exec: give the command after --: token-broker exec [NAME] -- COMMAND")
        args.argv = command
    try:
        return _COMMANDS[args.command](args)
    except BrokerError as exc:
        print(f"token-broker: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1


def run() -> None:
    """Console-script entry point (``token-broker`` and ``python -m broker``)."""
    if _command(sys.argv[1:]) in ("serve", "demo"):
        _defer_hangups()
    sys.exit(main())


_hangups: list[int] = []


def _defer_hangups() -> None:
    """Record SIGHUP from the first instant our code runs, instead of dying of it.

    The daemon installs its reload handler only once its event loop runs, a few
    hundred milliseconds later; ``systemctl reload`` right after ``start`` would
    otherwise kill it. A SIGHUP recorded here triggers one reload once it is ready.
    """
    import signal

    signal.signal(signal.SIGHUP, lambda signum, frame: _hangups.append(signum))


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand word: the first argument that is not an option."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def _serve(args: argparse.Namespace) -> int:
    from broker import config, daemon, logs, server, systemd

    settings = config.load(args.config, serving=True)
    redactor = logs.Redactor()
    logs.setup(redactor, args.log_format)
    server.harden()
    # Socket activation: systemd (or systemd-socket-activate) bound them for us.
    sockets = systemd.listen_sockets(allow_remote=settings.server.allow_remote)
    own: list[tuple[str, int, int]] = []
    if not sockets:
        sockets = server.open_listeners(settings.server)
        own = server.socket_files(settings.server)
    try:
        pending = lambda: bool(_hangups)  # noqa: E731
        server.run(daemon.serve(settings, sockets, redactor=redactor, hangup_pending=pending))
    finally:
        server.remove_socket_files(own)  # never the ones systemd passed
    return 0


def _demo(args: argparse.Namespace) -> int:
    from broker import demo, logs, server
    from broker.config import parse_duration

    if args.config is not None:
        print(
            "token-broker: demo takes no --config: it runs an issuer and a credential of its "
            f"own and reads no config; to serve {args.config}, run `token-broker serve "
            f"--config {args.config}`",
            file=sys.stderr,
        )
        return 2
    try:
        lifetime = parse_duration(args.lifetime)
    except ValueError as exc:
        print(f"token-broker: --lifetime: {exc}", file=sys.stderr)
        return 2
    if lifetime < 2:
        print("token-broker: --lifetime must be at least 2 seconds", file=sys.stderr)
        return 2
    rotate_every = None
    if args.rotate_every is not None:
        try:
            rotate_every = parse_duration(args.rotate_every)
        except ValueError as exc:
            print(f"token-broker: --rotate-every: {exc}", file=sys.stderr)
            return 2
        if rotate_every < 5:
            print("token-broker: --rotate-every must be at least 5 seconds", file=sys.stderr)
            return 2
    redactor = logs.Redactor()
    logs.setup(redactor, args.log_format)
    return server.run(demo.run(args.listen, lifetime, redactor, rotate_every))


def _token(args: argparse.Namespace) -> int:
    path = "/token" if args.name is None else f"/token/{args.name}"
    response = _ask_daemon(args, path)
    if response.status_code != 200:
        return _daemon_error(response)
    sys.stdout.write(response.text + "\n")
    return 0


def _list(args: argparse.Namespace) -> int:
    response = _ask_daemon(args, "/v1/credentials")
    if response.status_code != 200:
        return _daemon_error(response)
    rows: list[dict[str, Any]] = response.json()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    cycling = any(row.get("secret_cycling") for row in rows)
    head = ["NAME", "PROVIDER", "STATE", "EXPIRES_AT"]
    table = [(*head, *(("SECRET_AGE", "NEXT_CYCLE") if cycling else ()), "LAST_ERROR")]
    for row in rows:
        # A fresh credential has recovered: its last error is history, and beside "fresh" it
        # reads as a current fault (the status JSON keeps it, with its time).
        err = (row.get("last_error") or {}) if row["state"] != "fresh" else {}
        last = f"{err.get('error')}: {err.get('description')}" if err else "-"
        cells = [row["name"], row["provider"], row["state"], row["expires_at"] or "-"]
        if cycling:
            cyc = row.get("secret_cycling") or {}
            age = cyc.get("secret_age_seconds")
            cells += [_age(age) if age is not None else "-", cyc.get("next_cycle_at") or "-"]
            if cyc.get("last_error") and not err:  # a failed cycle, reported like a refresh
                last = f"cycle {cyc['last_error']['outcome']}: {cyc['last_error']['detail']}"
        table.append((*cells, last))
    columns = len(table[0]) - 1
    widths = [max(len(str(r[i])) for r in table) for i in range(columns)]
    for r in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    return 0


def _age(seconds: float) -> str:
    """A secret's age in the largest whole unit: 45s, 12m, 5h, 83d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _daemon(
    args: argparse.Namespace, *, from_config: bool = False, admin: bool = False
) -> tuple[TokenBroker, dict[str, str]]:
    """A TokenBroker for the running daemon, and any extra header its config requires.

    ``--url``, else ``$TOKEN_BROKER_URL``, else the config's first listen address
    when a config file exists, else ``http://127.0.0.1:8765``, so the commands
    that only talk to the daemon need no config. ``from_config``: the daemon that
    serves this config (``add``, ``remove``... notify it). ``admin``: a reload or
    a cycle, asked over the config's unix socket when it has one, where the
    daemon knows the caller's uid and lets root and its own user in without a key.
    """
    import os

    from broker.client import URL_ENV, TokenBroker

    url = None if from_config else getattr(args, "url", None) or os.environ.get(URL_ENV)
    extra: dict[str, str] = {}
    if not url:
        url, extra = _config_address(args, admin=admin)
    return TokenBroker(url, key=_client_key(args)), extra


def _config_address(
    args: argparse.Namespace, *, admin: bool = False
) -> tuple[str | None, dict[str, str]]:
    """The config file's listen address to ask (None: no config file, the default)."""
    import os

    from broker import config
    from broker.config import TcpListen, UnixListen

    explicit = args.config or os.environ.get("TOKEN_BROKER_CONFIG")
    if not explicit and not config.config_path().exists():
        return None, {}
    settings = config.load(args.config)
    listens = settings.server.listen
    unix = [x for x in listens if isinstance(x, UnixListen)]
    listen = unix[0] if admin and unix else listens[0]
    url = f"http://{listen}" if isinstance(listen, TcpListen) else str(listen)
    header = settings.server.require_header
    # broker.client always sends X-Token-Broker: 1; a config may name another header.
    return url, ({header: "1"} if header and header.lower() != "x-token-broker" else {})


def _ask_daemon(
    args: argparse.Namespace,
    path: str,
    method: str = "GET",
    *,
    from_config: bool = False,
    admin: bool = False,
    timeout: float = 5.0,
) -> Any:
    """One request to the running daemon (BrokerUnavailable if it cannot be reached)."""
    broker, extra = _daemon(args, from_config=from_config, admin=admin)
    broker.timeout = timeout
    with broker:
        response = broker.request(method, path, headers=extra)
    response.broker_url = broker.url  # for the advice on a refusal
    return response


def _exec(args: argparse.Namespace) -> int:
    from broker import execcmd
    from broker.config import parse_duration

    try:
        min_remaining = parse_duration(args.min_remaining)
        execcmd.parse_env(args.env)
    except ValueError as exc:  # UsageError included
        print(f"token-broker: exec: {exc}", file=sys.stderr)
        return 2
    broker, _ = _daemon(args)
    return execcmd.run(
        broker,
        args.name,
        args.argv,
        env_items=args.env,
        min_remaining=min_remaining,
        pass_key=args.pass_key,
    )


def _client_key(args: argparse.Namespace) -> str | None:
    """The client key from --key-file (never a command-line value).

    Without it broker.client reads $TOKEN_BROKER_CLIENT_KEY, else the file
    $TOKEN_BROKER_CLIENT_KEY_FILE names.
    """
    path = getattr(args, "key_file", None)
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError as exc:
        raise BrokerError(f"--key-file {path}: {exc.strerror}") from None


_KEY_HINT = (
    "pass the client key with --key-file PATH, or name its file in "
    "$TOKEN_BROKER_CLIENT_KEY_FILE (or put the key in $TOKEN_BROKER_CLIENT_KEY)"
)


def _detail(response: Any) -> str:
    """The ``detail`` of a daemon's error answer (or its status, if it has none)."""
    try:
        return str(response.json()["detail"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}"


def _daemon_error(response: Any) -> int:
    message = _refusal(response)
    if response.status_code == 401:
        message += f"; {_KEY_HINT}"
    print(f"token-broker: {message}", file=sys.stderr)
    return 1


def _refusal(response: Any) -> str:
    """The daemon's error answer in one phrase: ``code: detail``."""
    try:
        body = response.json()
        return f"{body['error']}: {body['detail']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}"


def _admin_advice(response: Any) -> str:
    """What to do when the daemon refused an administrator's request for want of a key."""
    url = str(getattr(response, "broker_url", ""))
    pid = _daemon_pid(url)
    hup = f"`kill -HUP {pid}`" if pid else "`kill -HUP <pid of token-broker serve>`"
    advice = (
        'ask it with a client key whose credentials are "*" (--key-file PATH or '
        "$TOKEN_BROKER_CLIENT_KEY_FILE), or reload it by signal: "
        f"`systemctl reload token-broker` for the system service, else {hup}"
    )
    if url.startswith("unix:"):
        import os

        return (
            f"{advice} (over its unix socket only root and the daemon's own user need no key; "
            f"this is uid {os.getuid()})"
        )
    return (
        f"{advice}; with a unix socket in [server] listen, root and the daemon's own user "
        "reload it over that socket without a key"
    )


def _daemon_pid(url: str) -> int | None:
    """The pid of the daemon at ``url``, where this user may see it (else None)."""
    import socket
    import struct

    try:
        if url.startswith("unix:"):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(2)
                sock.connect(url[5:])
                creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                return struct.unpack("3i", creds)[0] or None
        from urllib.parse import urlsplit

        port = urlsplit(url).port
        return _listener_pid(port) if port else None
    except (OSError, ValueError):
        return None


def _listener_pid(port: int) -> int | None:
    """The process listening on loopback TCP ``port``, from /proc (Linux)."""
    import os

    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    for entry in os.listdir("/proc") if inodes else ():
        if not entry.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                    return int(entry)
        except OSError:
            continue
    return None


def _out(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    print(json.dumps(data, indent=2) if getattr(args, "json", False) else text)


def _document(args: argparse.Namespace) -> Any:
    from broker.config import write_path
    from broker.configedit import ConfigDocument

    return ConfigDocument(write_path(args.config))


def _read_secret(args: argparse.Namespace, prompt: str) -> str:
    if args.secret_stdin:
        secret = sys.stdin.read()
        return secret[:-1] if secret.endswith("\n") else secret
    import getpass

    if not sys.stdin.isatty():
        raise BrokerError("no terminal to prompt for the secret: pass --secret-stdin")
    return getpass.getpass(prompt)


@dataclass
class _Reload:
    """What became of the request to reload after a config change."""

    ok: bool  # reloaded, or no daemon runs (it reads the file at start)
    note: str  # a few words for the command's line
    problem: str | None = None  # the refusal and what to do (stderr), when not ok


def _reload_daemon(args: argparse.Namespace) -> _Reload:
    """Tell a running daemon to reload; say what happened, and what to do if it refused."""
    try:
        response = _ask_daemon(args, "/v1/reload", "POST", from_config=True, admin=True)
    except BrokerError:
        return _Reload(True, "no daemon is running with this config; it will use this at start")
    if response.status_code == 200:
        return _Reload(True, "the running daemon reloaded")
    problem = f"the config is written, but the daemon refused to reload: {_refusal(response)}"
    if response.status_code in (401, 403):
        problem += f"; {_admin_advice(response)}"
    elif response.status_code == 400:
        problem += "; it keeps serving its previous config until this is fixed"
    return _Reload(False, "the running daemon did NOT reload (see the error)", problem)


def _reloaded(reload: _Reload) -> int:
    """The exit status after a config change: 1 when the daemon refused to take it."""
    if reload.problem:
        print(f"token-broker: {reload.problem}", file=sys.stderr)
    return 0 if reload.ok else 1


def _secret_ref(args: argparse.Namespace, name: str, several: bool = False) -> str | None:
    """The ``secret = …`` of a new credential from --secret (None: the default, keyring).

    ``file:~/x`` and a relative ``file:x`` are made absolute here, as a shell would
    not; ``file:DIR/`` and a bare ``systemd`` name one place per credential.
    """
    import os

    text = getattr(args, "secret", None)
    if text is None or text == "keyring":
        return None
    if text == "systemd":
        return f"systemd:{name}"
    if text.startswith("file:"):
        raw = text[5:]
        path = os.path.abspath(os.path.expanduser(raw))
        if raw.endswith("/") or os.path.isdir(path):
            return f"file:{os.path.join(path, name)}"
        if several:
            raise BrokerError(
                f"--secret {text}: names one file, and the project has several credentials; "
                "give a directory (file:DIR/) to write one file per credential"
            )
        return f"file:{path}"
    if text.startswith("systemd:") and several:
        raise BrokerError(
            f"--secret {text}: names one systemd credential, and the project has several; "
            "pass --secret systemd to name each after its credential"
        )
    return text


def _secret_lines(added: Any) -> list[str]:
    """What the user still has to do for the secret (systemd: encrypt it for the service)."""
    stored = added.stored
    if stored is None or not stored.todo:
        return []
    encrypt, load = stored.todo
    return [
        f"  {encrypt}    # as root; reads the client secret on stdin: paste it, then Ctrl-D",
        f"  and in the unit (systemctl edit token-broker): {load}",
    ]


def _default_line(added: Any) -> str | None:
    """A warning when ``[server] default`` was written for this addition."""
    if not added.default_written:
        return None
    if added.default == added.name:
        return f"{added.name} is now the [server] default: GET /token serves it"
    return (
        f'[server] default = "{added.default}" written: GET /token, `token-broker token` and '
        f"TokenBroker().token() keep serving {added.default}; ask for the new one by name "
        f"(/token/{added.name}), or pass --default to make it the default"
    )


def _add(args: argparse.Namespace) -> int:
    from broker import credentials

    doc = _document(args)
    if args.provider == "oauth2" and not args.token_url:
        print("token-broker: --token-url is required with --provider oauth2", file=sys.stderr)
        return 2
    if args.org_id is not None and not args.org_id.endswith("@AdobeOrg"):
        print(f"token-broker: --org-id {args.org_id!r}: expected the IMS org id, which ends in "
              "@AdobeOrg (e.g. ABCDEF0123456789ABCDEF01@AdobeOrg; in the Developer Console "
              "project JSON, project.org.ims_org_id)", file=sys.stderr)  # fmt: skip
        return 2
    table = {
        "provider": args.provider,
        "client_id": args.client_id,
        "org_id": args.org_id,
        "scopes": [s.strip() for s in args.scopes.split(",") if s.strip()] if args.scopes else None,
        "ims_url": args.ims_url,
        "token_url": args.token_url,
        "auth_method": args.auth_method,
        "secret": _secret_ref(args, args.name),
    }
    # Check the entry before asking for the secret: a typo should not cost a paste.
    _document(args).add_credential(args.name, table)
    secret = _read_secret(args, f"Client secret for {args.name}: ")
    added = credentials.add(doc, args.name, table, [secret], check=not args.no_verify,
                            force=args.force, make_default=args.default)  # fmt: skip
    reload = _reload_daemon(args)
    verified = "verified with the issuer, " if added.verified else ""
    where = added.stored.where if added.stored else "the keyring"
    done = "secret stored in" if added.secrets_stored else "secret to go to"
    lines = [f"added {added.name}: {verified}{done} {where}, {added.config} "
             f"{'created' if not doc.existed else 'updated'}; {reload.note}",
             *_secret_lines(added)]  # fmt: skip
    if line := _default_line(added):
        lines.append(line)
    _out(
        args,
        {"added": added.name, "config": str(added.config), "verified": added.verified,
         "secret": where, "todo": added.stored.todo if added.stored else [],
         "default": added.default if added.default_written else None,
         "daemon": reload.note, "daemon_reloaded": reload.ok},
        "\n".join(lines),
    )  # fmt: skip
    return _reloaded(reload)


def _import(args: argparse.Namespace) -> int:
    from broker import credentials

    path = Path(args.file)
    found, refused = credentials.read_console_json(path)
    for line in refused:
        print(f"token-broker: skipped {line}", file=sys.stderr)
    if not found:
        print(f"token-broker: {path}: no OAuth Server-to-Server credential to import",
              file=sys.stderr)  # fmt: skip
        return 1
    if args.name and len(found) > 1:
        print("token-broker: --name needs a file with one OAuth Server-to-Server credential",
              file=sys.stderr)  # fmt: skip
        return 2
    names = [args.name] if args.name else credentials.default_names(found)
    refs = [_secret_ref(args, n, several=len(found) > 1) for n in names]
    doc = _document(args)
    done = credentials.import_console(
        doc, found, names, check=not args.no_verify, ims_url=args.ims_url, secret_refs=refs,
        force=args.force, make_default=args.default,
    )  # fmt: skip
    reload = _reload_daemon(args)
    todo = any(a.stored and a.stored.todo for a in done)
    deleted = _offer_delete(args, path, needed=todo)
    cycling = {a.name: _cycling_note(c) for a, c in zip(done, found, strict=True)}
    lines = []
    for a, c in zip(done, found, strict=True):
        where = a.stored.where if a.stored else "the keyring"
        lines.append(f"imported {a.name} (from {c.name!r}; {a.secrets_stored} secret(s) to "
                     f"{where}); {cycling[a.name][0]}")  # fmt: skip
        lines += _secret_lines(a)
        if line := _default_line(a):
            lines.append(line)
    lines.append(f"{done[0].config} {'created' if not doc.existed else 'updated'}; {reload.note}")
    _out(
        args,
        {"imported": [a.name for a in done], "skipped": refused, "file_deleted": deleted,
         "config": str(done[0].config), "daemon": reload.note, "daemon_reloaded": reload.ok,
         "todo": {a.name: a.stored.todo for a in done if a.stored and a.stored.todo},
         "default": next((a.default for a in done if a.default_written), None),
         "secret_cycling": {n: t for n, (_, t) in cycling.items()}},
        "\n".join(lines),
    )  # fmt: skip
    return _reloaded(reload)


def _cycling_note(found: Any) -> tuple[str, dict[str, Any]]:
    """Whether the imported credential can cycle its secret: a sentence, and the JSON facts."""
    facts = {
        "credential_id": found.credential_id,
        "console_org_id": found.console_org_id,
        "management_api": found.management_api,
    }
    if not (found.credential_id and found.console_org_id):
        return "secret cycling: the file has no credential id or Console org id", facts
    if not found.management_api:
        return (
            "secret cycling: the project does not list the I/O Management API "
            "(AdobeIOManagementAPISDK); add it in the Developer Console, then set rotate_every",
            facts,
        )
    return 'secret cycling possible: set rotate_every (e.g. "30d") to turn it on', facts


def _offer_delete(args: argparse.Namespace, path: Any, *, needed: bool = False) -> bool:
    """Delete the project JSON (it holds the secret in plain text) if the user wants.

    ``needed``: a secret is still to be copied out of it (``systemd-creds encrypt``), so
    it is kept whatever was asked, and the user is told to delete it afterwards.
    """
    warning = f"{path} holds the client secret in plain text"
    if needed:
        print(f"token-broker: {warning}: kept for the systemd-creds line above; delete it "
              "once the secret is encrypted", file=sys.stderr)  # fmt: skip
        return False
    if args.delete:
        answer = True
    elif args.keep or not sys.stdin.isatty():
        if not args.keep:
            print(f"token-broker: {warning}: delete it (or pass --delete)", file=sys.stderr)
        answer = False
    else:
        answer = input(f"{warning}. Delete it now? [y/N] ").strip().lower() in ("y", "yes")
    if answer:
        path.unlink()
    return answer


def _remove(args: argparse.Namespace) -> int:
    from broker import credentials

    removed = credentials.remove(_document(args), args.name)
    reload = _reload_daemon(args)
    extra = " (it was the [server] default; that key is gone too)" if removed.was_default else ""
    items = ", ".join(removed.keyring_items) or "none"
    left = f"; its secret, {removed.left}, is left in place" if removed.left else ""
    _out(
        args,
        {"removed": removed.name, "keyring_items": removed.keyring_items, "left": removed.left,
         "daemon": reload.note, "daemon_reloaded": reload.ok},
        f"removed {removed.name}{extra}; keyring items deleted: {items}{left}; {reload.note}",
    )  # fmt: skip
    return _reloaded(reload)


def _rotate(args: argparse.Namespace) -> int:
    from broker import credentials

    if args.auto:
        return _rotate_auto(args)
    doc = _document(args)
    if args.finish:
        credentials.rotate_finish(doc, args.name)
        step, text = "finished", "the old secret is deleted, the new one is the only one"
    elif args.abort:
        credentials.rotate_abort(doc, args.name)
        step, text = "aborted", "the new secret is deleted, the old one stays"
    else:
        secret = _read_secret(args, f"New client secret for {args.name}: ")
        credentials.rotate_start(doc, args.name, secret, check=not args.no_verify)
        step = "started"
        text = (
            "the new secret is stored beside the old one and in use; after deleting the old "
            f"secret at the issuer, run `token-broker rotate {args.name} --finish`"
        )
    reload = _reload_daemon(args)
    _out(args, {"rotation": step, "name": args.name, "daemon": reload.note,
                "daemon_reloaded": reload.ok},
         f"rotation of {args.name} {step}: {text}; {reload.note}")  # fmt: skip
    return _reloaded(reload)


def _rotate_auto(args: argparse.Namespace) -> int:
    """One secret cycle: asked of the daemon that serves this config, so that
    it never refreshes with a secret being deleted; run here when no daemon answers."""
    from broker import config
    from broker.client import BrokerUnavailable

    settings = config.load(args.config)
    cred = settings.credentials.get(args.name)
    if cred is None:
        raise ConfigError(f"{settings.path}: no credential named {args.name!r}")
    wait = getattr(cred, "rotate_verify", 300.0) + 6 * cred.policy.timeout + 30
    try:
        _ask_daemon(args, "/healthz", from_config=True)
    except BrokerUnavailable:
        result = _cycle_here(cred)
        where = "no daemon answered: the cycle ran in this process"
    else:
        try:
            response = _ask_daemon(
                args, f"/v1/credentials/{args.name}/rotate", "POST", from_config=True,
                admin=True, timeout=wait,
            )  # fmt: skip
        except BrokerUnavailable as exc:
            print(f"token-broker: {exc}; the cycle may still be running: see `token-broker "
                  "list`", file=sys.stderr)  # fmt: skip
            return 1
        if response.status_code in (401, 403):
            print(f"token-broker: {_refusal(response)}; {_admin_advice(response)}",
                  file=sys.stderr)  # fmt: skip
            return 1
        if response.status_code == 429:  # rotate_cooldown: the detail says when it may be asked
            print(f"token-broker: {args.name} was not cycled: {_detail(response)}",
                  file=sys.stderr)  # fmt: skip
            return 1
        if response.status_code != 200:
            return _daemon_error(response)
        result = response.json()
        where = "by the running daemon"
    _out(args, {**result, "where": where},
         f"cycled {args.name} {where}: {result['detail']}")  # fmt: skip
    return 0


def _cycle_here(cred: Any) -> dict[str, Any]:
    import asyncio
    import time

    from broker import logs
    from broker.config import AdobeSettings
    from broker.console import Cycle, StateFile
    from broker.files import state_dir
    from broker.providers import issuer_client
    from broker.secrets import SecretStore

    if not isinstance(cred, AdobeSettings) or not cred.cycling:
        raise ConfigError(
            f'credential {cred.name!r}: secret cycling needs provider "adobe", '
            "credential_id and console_org_id (`token-broker import` records both)"
        )
    store = SecretStore.of(cred.secret, cred.name)
    redactor = logs.Redactor()  # the steps are logged to stderr, through the redaction net
    logs.setup(redactor)

    async def run() -> dict[str, Any]:
        async with issuer_client(cred.policy.timeout, cred.ca_file) as client:
            cycle = Cycle(cred, client=client, store=store, redactor=redactor,
                          state=StateFile(state_dir(), cred.name), clock=time.time)  # fmt: skip
            return (await cycle.run()).as_json()

    return asyncio.run(run())


def _reload(args: argparse.Namespace) -> int:
    response = _ask_daemon(args, "/v1/reload", "POST", admin=True)
    if response.status_code in (401, 403):
        print(f"token-broker: {_refusal(response)}; {_admin_advice(response)}", file=sys.stderr)
        return 1
    if response.status_code != 200:
        return _daemon_error(response)
    result = response.json()
    text = "; ".join(f"{k}: {', '.join(v) or 'none'}" for k, v in result.items())
    _out(args, result, f"reloaded ({text})")
    return 0


def _health(args: argparse.Namespace) -> int:
    response = _ask_daemon(args, "/readyz" if args.ready else "/healthz")
    if response.status_code != 200:
        return _daemon_error(response)
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from broker import credentials

    checks = credentials.doctor(args.config, offline=args.offline)
    failed = any(c.ok is False for c in checks)
    if args.json:
        rows = [{"verdict": c.verdict, "check": c.text} for c in checks]
        print(json.dumps({"ok": not failed, "checks": rows}, indent=2))
    else:
        for c in checks:
            print(f"{c.verdict:>4}  {c.text}")
    return 1 if failed else 0


def _client(args: argparse.Namespace) -> int:
    from broker import access

    doc = _document(args)
    if args.client_command == "list":
        clients = {
            name: list(table.get("credentials", [])) for name, table in doc.clients().items()
        }
        _out(
            args,
            {"clients": clients},
            "\n".join(f"{n}: {', '.join(c)}" for n, c in clients.items()) or "no clients",
        )
        return 0
    if args.client_command == "remove":
        doc.remove_client(args.name)
        doc.write()
        reload = _reload_daemon(args)
        _out(args, {"removed": args.name, "daemon": reload.note, "daemon_reloaded": reload.ok},
             f"removed client {args.name}; {reload.note}")  # fmt: skip
        return _reloaded(reload)
    names = [c.strip() for c in args.credentials.split(",") if c.strip()]
    if args.name in doc.clients() and not args.replace:
        raise BrokerError(
            f"{doc.path}: a client named {args.name!r} exists already "
            "(--replace gives it a new key; the old key stops working)"
        )
    first = not doc.clients()
    key = access.new_key()
    doc.set_client(args.name, access.key_digest(key).hex(), names)
    doc.write()
    reload = _reload_daemon(args)
    tightened = _private_stdout()
    if args.json:
        print(json.dumps({"client": args.name, "key": key, "credentials": names,
                          "daemon": reload.note, "daemon_reloaded": reload.ok}))  # fmt: skip
    else:
        print(key)  # alone on stdout, so KEY=$(token-broker client add ...) works
    notes = [f"client {args.name} may read {', '.join(names)}; this key is shown only now (the "
             f"config keeps its SHA-256); {reload.note}"]  # fmt: skip
    if tightened:
        notes.append(f"{tightened} holds a key: made it mode 0600")
    if first:
        notes.append(
            "this is the first client key: from now on every token and status request needs "
            "one (`curl /token` without Authorization: Bearer KEY is 401), so give each tool "
            "on this host its key, or a key file in $TOKEN_BROKER_CLIENT_KEY_FILE"
        )
    print("token-broker: " + "\ntoken-broker: ".join(notes), file=sys.stderr)
    return _reloaded(reload)


def _private_stdout() -> str | None:
    """Make stdout's file 0600 when it is a file others may read (``> key.txt``).

    The key goes to stdout so that a user can redirect it; a shell creates that file
    with its umask, usually 0644. Returns the file's path when its mode was narrowed.
    """
    import os
    import stat

    try:
        st = os.fstat(sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        return None  # not a real file descriptor (tests capture stdout)
    if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o077 or st.st_uid != os.geteuid():
        return None
    try:
        os.fchmod(sys.stdout.fileno(), stat.S_IMODE(st.st_mode) & 0o600)
        return os.readlink(f"/proc/self/fd/{sys.stdout.fileno()}")
    except OSError:
        return "the file stdout writes to"


def _tls(args: argparse.Namespace) -> int:
    import os

    from broker import tls
    from broker.tokens import rfc3339

    files = tls.TlsFiles.default()
    if args.tls_command == "init":
        created, ca = tls.init_ca(files)
        valid = f"valid until {rfc3339(ca.not_after)}"
        if created:
            print(
                f"created a local CA: {ca.path} ({valid}), private key {files.ca_key} "
                "(mode 0600); clients trust it through `token-broker tls ca [--bundle]`"
            )
        else:
            print(f"a local CA exists already: {ca.path} ({valid}); left alone")
        return 0
    # The system service keeps its CA in a directory private to it, and publishes the
    # public parts in its runtime directory: that is where other users find them.
    # Either is checked before it is printed: tools trust what this prints, for Adobe too.
    published = Path("/run/token-broker")
    if not args.bundle:
        for candidate in (files.ca_cert, published / "ca.crt"):
            if os.path.lexists(candidate):
                fix = tls.start_over(files) if candidate == files.ca_cert else None
                print(tls.published_ca(candidate, fix))  # alone on stdout, for $(...)
                return 0
        raise BrokerError(
            f"the local CA certificate {files.ca_cert} does not exist: run `token-broker tls init`"
        )
    if not os.path.lexists(files.ca_cert) and (published / "ca-bundle.crt").is_file():
        tls.published_ca(published / "ca.crt")
        print(published / "ca-bundle.crt")  # the system service's, kept current by it
        return 0
    bundle = tls.write_bundle(files)
    done = f"wrote {bundle.path}" if bundle.changed else f"{bundle.path} is up to date"
    print(
        f"token-broker: {done}: {bundle.source} ({bundle.system}) + the token-broker CA "
        f"({files.ca_cert})",
        file=sys.stderr,
    )
    print(bundle.path)  # alone on stdout, like `tls ca`
    return 0


_COMMANDS = {
    "serve": _serve,
    "demo": _demo,
    "token": _token,
    "list": _list,
    "add": _add,
    "import": _import,
    "remove": _remove,
    "rotate": _rotate,
    "reload": _reload,
    "doctor": _doctor,
    "health": _health,
    "exec": _exec,
    "client": _client,
    "tls": _tls,
}
