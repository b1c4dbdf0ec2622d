"""The ``token-broker`` command: ``main(argv) -> exit code``.

Exit codes: 0 success, 1 failure, 2 usage. Errors go to stderr in one or two
plain sentences, never with a traceback for an expected failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="token-broker",
        description="Serve OAuth access tokens on loopback; the client secret stays here.",
    )
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", metavar="PATH", help="config file (default: see README)")
    config.add_argument(
        "--key-file",
        metavar="PATH",
        help="client key for asking the daemon (default: $TOKEN_BROKER_CLIENT_KEY, else the "
        "file $TOKEN_BROKER_CLIENT_KEY_FILE names)",
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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("serve", parents=[config, logs], help="run the daemon in the foreground")
    demo = sub.add_parser(
        "demo", parents=[config, logs], help="zero-setup demo: embedded issuer + broker"
    )
    demo.add_argument("--listen", default="127.0.0.1:8765", help="default 127.0.0.1:8765")
    demo.add_argument(
        "--rotate-every",
        metavar="DURATION",
        help='cycle the demo secret this often, e.g. "30s" (DESIGN §11)',
    )
    demo.add_argument(
        "--lifetime", type=float, default=120.0, help="demo token lifetime in seconds"
    )
    token = sub.add_parser("token", parents=[config, daemon], help="print a token from the daemon")
    token.add_argument("name", nargs="?", help="credential (default: the default credential)")
    lst = sub.add_parser("list", parents=[config, daemon], help="show each credential's state")
    lst.add_argument("--json", action="store_true", help="print the status JSON")

    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument("--json", action="store_true", help="machine-readable output")
    secret_in = argparse.ArgumentParser(add_help=False)
    secret_in.add_argument(
        "--secret-stdin", action="store_true", help="read the secret from stdin (no prompt)"
    )
    secret_in.add_argument(
        "--no-verify", action="store_true", help="skip the test token request to the issuer"
    )
    add = sub.add_parser(
        "add", parents=[config, json_flag, secret_in], help="add a credential (secret to keyring)"
    )
    add.add_argument("name")
    add.add_argument("--client-id", required=True)
    add.add_argument("--provider", choices=["adobe", "oauth2"], default="adobe")
    add.add_argument("--org-id", help="Adobe IMS org, e.g. ABC123@AdobeOrg")
    add.add_argument("--scopes", help="comma-separated, e.g. openid,AdobeID")
    add.add_argument("--ims-url", help="Adobe IMS base URL (default: production)")
    add.add_argument("--token-url", help="token endpoint (oauth2)")
    add.add_argument("--auth-method", choices=["client_secret_basic", "client_secret_post"])
    imp = sub.add_parser(
        "import", parents=[config, json_flag], help="import an Adobe Developer Console JSON"
    )
    imp.add_argument("file")
    imp.add_argument("--name", help="credential name (one OAuth Server-to-Server credential)")
    imp.add_argument("--no-verify", action="store_true", help="skip the test token request")
    imp.add_argument("--ims-url", help="Adobe IMS base URL (default: production)")
    keep = imp.add_mutually_exclusive_group()
    keep.add_argument("--delete", action="store_true", help="delete FILE afterwards, no prompt")
    keep.add_argument("--keep", action="store_true", help="keep FILE, no prompt")
    rm = sub.add_parser("remove", parents=[config, json_flag], help="remove a credential")
    rm.add_argument("name")
    rot = sub.add_parser(
        "rotate", parents=[config, json_flag, secret_in], help="rotate a secret without downtime"
    )
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
    sub.add_parser(
        "reload",
        parents=[config, daemon, json_flag],
        help="make the daemon re-read config and secrets",
    )
    health = sub.add_parser(
        "health",
        parents=[config, daemon],
        help="exit 0 if the daemon is healthy (container probes)",
    )
    health.add_argument("--ready", action="store_true", help="ask /readyz instead of /healthz")
    _exec_parser(sub, [config, daemon])
    doc = sub.add_parser("doctor", parents=[config, json_flag], help="check the setup")
    doc.add_argument("--offline", action="store_true", help="no token requests to issuers")

    client = sub.add_parser("client", help="client keys: who may read which token")
    client_sub = client.add_subparsers(dest="client_command", required=True, metavar="ACTION")
    cadd = client_sub.add_parser(
        "add", parents=[config, json_flag], help="create a client key (printed once)"
    )
    cadd.add_argument("name")
    cadd.add_argument(
        "--credentials", required=True, help='comma-separated credential names, or "*" for all'
    )
    cadd.add_argument("--replace", action="store_true", help="give an existing client a new key")
    crm = client_sub.add_parser("remove", parents=[config, json_flag], help="remove a client")
    crm.add_argument("name")
    client_sub.add_parser("list", parents=[config, json_flag], help="show the clients")

    # -- tls (DESIGN §10): the local CA of the HTTPS listener; the logic is in broker/tls.py
    tls = sub.add_parser("tls", help="the local CA of the HTTPS (IMS) listener")
    tls_sub = tls.add_subparsers(dest="tls_command", required=True, metavar="ACTION")
    tls_sub.add_parser("init", parents=[config], help="create the local CA (once)")
    tls_ca = tls_sub.add_parser("ca", parents=[config], help="print the CA certificate's path")
    tls_ca.add_argument(
        "--bundle",
        action="store_true",
        help="print instead the path of a bundle of the system's CAs plus the broker's "
        "(for REQUESTS_CA_BUNDLE, which replaces requests' trust store)",
    )
    return parser


def _exec_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    ex = sub.add_parser(
        "exec",
        parents=parents,
        help="run a command with the token in its environment",
        usage="token-broker exec [NAME] [--env VAR=FIELD]... [--min-remaining DUR] [--pass-key] "
        "[--url URL] -- COMMAND [ARG...]",
    )
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
    from broker import config, logs, server, systemd

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
        server.run(server.serve(settings, sockets, redactor=redactor, hangup_pending=pending))
    finally:
        server.remove_socket_files(own)  # never the ones systemd passed
    return 0


def _demo(args: argparse.Namespace) -> int:
    from broker import demo, logs, server
    from broker.config import parse_duration

    if args.lifetime < 2:
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
    return server.run(demo.run(args.listen, args.lifetime, redactor, rotate_every))


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
        err = row.get("last_error") or {}
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
    args: argparse.Namespace, *, from_config: bool = False
) -> tuple[TokenBroker, dict[str, str]]:
    """A TokenBroker for the running daemon, and any extra header its config requires.

    ``--url``, else ``$TOKEN_BROKER_URL``, else the config's first listen address
    when a config file exists, else ``http://127.0.0.1:8765`` (DESIGN §9), so the
    commands that only talk to the daemon need no config. ``from_config``: the
    daemon that serves this config (``add``, ``remove``... notify it).
    """
    import os

    from broker.client import URL_ENV, TokenBroker

    url = None if from_config else getattr(args, "url", None) or os.environ.get(URL_ENV)
    extra: dict[str, str] = {}
    if not url:
        url, extra = _config_address(args)
    return TokenBroker(url, key=_client_key(args)), extra


def _config_address(args: argparse.Namespace) -> tuple[str | None, dict[str, str]]:
    """The first listen address of the config file, if there is one (None: the default)."""
    import os

    from broker import config
    from broker.config import TcpListen

    explicit = args.config or os.environ.get("TOKEN_BROKER_CONFIG")
    if not explicit and not config.config_path().exists():
        return None, {}
    settings = config.load(args.config)
    listen = settings.server.listen[0]
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
    timeout: float = 5.0,
) -> Any:
    """One request to the running daemon (BrokerUnavailable if it cannot be reached)."""
    broker, extra = _daemon(args, from_config=from_config)
    broker.timeout = timeout
    with broker:
        return broker.request(method, path, headers=extra)


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


def _detail(response: Any) -> str:
    """The ``detail`` of a daemon's error answer (or its status, if it has none)."""
    try:
        return str(response.json()["detail"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}"


def _daemon_error(response: Any) -> int:
    try:
        body = response.json()
        message = f"{body['error']}: {body['detail']}"
    except (ValueError, KeyError, TypeError):
        message = f"HTTP {response.status_code}"
    print(f"token-broker: {message}", file=sys.stderr)
    return 1


def _out(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    print(json.dumps(data, indent=2) if getattr(args, "json", False) else text)


def _document(args: argparse.Namespace) -> Any:
    from broker.config import config_path
    from broker.configedit import ConfigDocument

    return ConfigDocument(config_path(args.config))


def _read_secret(args: argparse.Namespace, prompt: str) -> str:
    if args.secret_stdin:
        secret = sys.stdin.read()
        return secret[:-1] if secret.endswith("\n") else secret
    import getpass

    if not sys.stdin.isatty():
        raise BrokerError("no terminal to prompt for the secret: pass --secret-stdin")
    return getpass.getpass(prompt)


def _reload_daemon(args: argparse.Namespace) -> str:
    """Tell a running daemon to reload; say what happened in a few words."""
    try:
        response = _ask_daemon(args, "/v1/reload", "POST", from_config=True)
    except BrokerError:
        return "no daemon is running with this config; it will use this at start"
    if response.status_code == 200:
        return "the running daemon reloaded"
    try:
        return f"the daemon refused to reload: {response.json()['detail']}"
    except (ValueError, KeyError):
        return f"the daemon refused to reload (HTTP {response.status_code})"


def _add(args: argparse.Namespace) -> int:
    from broker import credentials

    doc = _document(args)
    if args.provider == "oauth2" and not args.token_url:
        print("token-broker: --token-url is required with --provider oauth2", file=sys.stderr)
        return 2
    table = {
        "provider": args.provider,
        "client_id": args.client_id,
        "org_id": args.org_id,
        "scopes": [s.strip() for s in args.scopes.split(",") if s.strip()] if args.scopes else None,
        "ims_url": args.ims_url,
        "token_url": args.token_url,
        "auth_method": args.auth_method,
    }
    # Check the entry before asking for the secret: a typo should not cost a paste.
    _document(args).add_credential(args.name, table)
    secret = _read_secret(args, f"Client secret for {args.name}: ")
    added = credentials.add(doc, args.name, table, [secret], check=not args.no_verify)
    note = _reload_daemon(args)
    verified = "verified with the issuer, " if added.verified else ""
    _out(
        args,
        {"added": added.name, "config": str(added.config), "verified": added.verified,
         "daemon": note},
        f"added {added.name}: {verified}secret stored in the keyring, {added.config} updated; "
        f"{note}",
    )  # fmt: skip
    return 0


def _import(args: argparse.Namespace) -> int:
    from pathlib import Path

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
    names = [args.name] if args.name else [credentials.console_name(c.name) for c in found]
    doc = _document(args)
    done = credentials.import_console(
        doc, found, names, check=not args.no_verify, ims_url=args.ims_url
    )
    note = _reload_daemon(args)
    deleted = _offer_delete(args, path)
    cycling = {a.name: _cycling_note(c) for a, c in zip(done, found, strict=True)}
    _out(
        args,
        {"imported": [a.name for a in done], "skipped": refused, "file_deleted": deleted,
         "daemon": note, "secret_cycling": {n: t for n, (_, t) in cycling.items()}},
        "\n".join(f"imported {a.name} ({a.secrets_stored} secret(s) to the keyring); "
                  f"{cycling[a.name][0]}" for a in done) + f"\n{note}",
    )  # fmt: skip
    return 0


def _cycling_note(found: Any) -> tuple[str, dict[str, Any]]:
    """Whether the imported credential can cycle its secret (DESIGN §11): a sentence, JSON."""
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


def _offer_delete(args: argparse.Namespace, path: Any) -> bool:
    warning = f"{path} holds the client secret in plain text"
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
    note = _reload_daemon(args)
    extra = " (it was the [server] default; that key is gone too)" if removed.was_default else ""
    items = ", ".join(removed.keyring_items) or "none"
    _out(
        args,
        {"removed": removed.name, "keyring_items": removed.keyring_items, "daemon": note},
        f"removed {removed.name}{extra}; keyring items deleted: {items}; {note}",
    )
    return 0


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
    note = _reload_daemon(args)
    _out(args, {"rotation": step, "name": args.name, "daemon": note},
         f"rotation of {args.name} {step}: {text}; {note}")  # fmt: skip
    return 0


def _rotate_auto(args: argparse.Namespace) -> int:
    """One secret cycle (DESIGN §11): asked of the daemon that serves this config, so that
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
                args, f"/v1/credentials/{args.name}/rotate", "POST", from_config=True, timeout=wait
            )
        except BrokerUnavailable as exc:
            print(f"token-broker: {exc}; the cycle may still be running: see `token-broker "
                  "list`", file=sys.stderr)  # fmt: skip
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
    response = _ask_daemon(args, "/v1/reload", "POST")
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
    from broker.config import config_path

    checks = credentials.doctor(config_path(args.config), offline=args.offline)
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
        note = _reload_daemon(args)
        _out(args, {"removed": args.name, "daemon": note}, f"removed client {args.name}; {note}")
        return 0
    names = [c.strip() for c in args.credentials.split(",") if c.strip()]
    if args.name in doc.clients() and not args.replace:
        raise BrokerError(
            f"{doc.path}: a client named {args.name!r} exists already "
            "(--replace gives it a new key; the old key stops working)"
        )
    key = access.new_key()
    doc.set_client(args.name, access.key_digest(key).hex(), names)
    doc.write()
    note = _reload_daemon(args)
    if args.json:
        print(json.dumps({"client": args.name, "key": key, "credentials": names, "daemon": note}))
    else:
        print(key)  # alone on stdout, so KEY=$(token-broker client add ...) works
        print(
            f"token-broker: client {args.name} may read {', '.join(names)}; this key is shown "
            f"only now (the config keeps its SHA-256); {note}",
            file=sys.stderr,
        )
    return 0


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
