"""The parser of the ``token-broker`` command: every command, its options and its help.

Only the text of the command line lives here; each command's work is in the module
:mod:`broker.cli` names for it. Building the parser imports nothing but argparse.
"""

from __future__ import annotations

import argparse
from typing import Any


class _Version(argparse.Action):
    """``--version``, read from the installed metadata only when asked (it costs ~20 ms)."""

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


#: Arguments several commands share, by the word that names them in :func:`_sub`'s ``shared``.
_SHARED: dict[str, dict[str, dict[str, Any]]] = {
    "name": {"name": {}},
    "name?": {"name": dict(nargs="?", help="credential (default: the default credential)")},
    "config": {"--config": dict(metavar="PATH", help=_READ_CONFIG)},
    "config_write": {"--config": dict(metavar="PATH", help=_WRITE_CONFIG)},
    # Only on commands that talk to a running daemon: they send the key with each request.
    "key": {
        "--key-file": dict(
            metavar="PATH",
            help="a file holding the client key to show the daemon, once it has [clients.NAME] "
            "keys (default: $TOKEN_BROKER_CLIENT_KEY, else the file $TOKEN_BROKER_CLIENT_KEY_FILE "
            "names)",
        )
    },
    "daemon": {
        "--url": dict(
            help="the running daemon: http://HOST:PORT or unix:/path (default: $TOKEN_BROKER_URL, "
            "else the config's first listen address, else http://127.0.0.1:8765)"
        )
    },
    "logs": {
        "--log-format": dict(choices=["text", "json"], default="text", help="log lines on stderr")
    },
    "json": {"--json": dict(action="store_true", help="machine-readable output")},
    "secret_in": {
        "--secret-stdin": dict(action="store_true", help="read the secret from stdin (no prompt)"),
        "--no-verify": dict(action="store_true", help="skip the test token request to the issuer"),
    },
    "secret_out": {
        "--secret": dict(
            metavar="REF",
            help="where the secret goes, written into the config as `secret = REF`: keyring "
            "(default: the OS keyring), file:PATH (written 0600, its directory made 0700; "
            "for a server without a Secret Service), systemd:NAME (prints the systemd-creds "
            "line to run; for the system service)",
        ),
        "--force": dict(
            action="store_true",
            help="replace a secret file or keyring item that holds another secret",
        ),
        "--default": dict(
            action="store_true",
            help="make this the [server] default credential, served by GET /token (without it, "
            "an existing single credential stays the default)",
        ),
    },
}


def _sub(
    sub: Any,
    name: str,
    shared: str,
    summary: str,
    description: str,
    examples: str,
    **kwargs: Any,
) -> argparse.ArgumentParser:
    """A subcommand with a one-line summary, a paragraph of description and examples, and
    the options of :data:`_SHARED` that ``shared`` names (space-separated)."""
    import textwrap

    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=summary,
        description=textwrap.fill(description, width=79),
        epilog="examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **kwargs,
    )
    for word in shared.split():
        for flag, options in _SHARED[word].items():
            parser.add_argument(flag, **options)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, with a description and examples for every command."""
    parser = argparse.ArgumentParser(
        prog="token-broker",
        description="Serve OAuth access tokens on loopback; the client secret stays here.",
        epilog="Start with `token-broker demo` (no setup), then `token-broker import "
        "project.json` (an Adobe Developer Console download) and `token-broker serve`. "
        "`token-broker COMMAND --help` describes each command, with examples.",
    )
    parser.add_argument("--version", action=_Version, nargs=0, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _daemon_commands(sub)
    _setup_commands(sub)
    _asking_commands(sub)
    _client_commands(sub)
    _tls_commands(sub)
    return parser


def _daemon_commands(sub: Any) -> None:
    """serve, demo, token, list: the daemon, and asking it."""

    _sub(sub, "serve", "config logs", "run the daemon in the foreground",
         "Run the daemon in the foreground: it reads the config, fetches a token for every "
         "credential, refreshes each ahead of its expiry and serves them on the listen "
         "addresses. It logs to stderr. SIGHUP (or `token-broker reload`) re-reads the "
         "config and the secrets; SIGTERM stops it.",
         "  token-broker serve\n"
         "  token-broker serve --config /etc/token-broker/config.toml\n"
         "  token-broker serve --log-format json\n")  # fmt: skip
    demo = _sub(sub, "demo", "logs", "zero-setup demo: embedded issuer + broker",
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
    _sub(sub, "token", "config daemon key name?", "print a token from the daemon",
         "Ask the running daemon for a credential's access token and print it alone "
         "on stdout. Needs no config file: see --url.",
         "  token-broker token\n"
         "  TOKEN=$(token-broker token adobe)\n")  # fmt: skip
    lst = _sub(sub, "list", "config daemon key", "show each credential's state",
               "Show each credential the daemon serves: provider, state, when its token "
               "expires, and the last error while the credential is not fresh (with cycling, "
               "the secret's age and the next cycle).",
               "  token-broker list\n"
               "  token-broker list --json --url unix:/run/token-broker/broker.sock\n")  # fmt: skip
    lst.add_argument("--json", action="store_true", help="print the status JSON")


def _setup_commands(sub: Any) -> None:
    """add, import, remove, rotate: credentials in the config and their secrets."""
    add = _sub(sub, "add", "config_write key json secret_in secret_out name",
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
    add.add_argument("--client-id", required=True)
    add.add_argument("--provider", choices=["adobe", "oauth2"], default="adobe")
    add.add_argument("--org-id", help="Adobe IMS org, e.g. ABCDEF0123456789ABCDEF01@AdobeOrg")
    add.add_argument("--scopes", help="comma-separated, e.g. openid,AdobeID")
    add.add_argument("--ims-url", help="Adobe IMS base URL (default: production)")
    add.add_argument("--token-url", help="token endpoint (oauth2)")
    add.add_argument("--auth-method", choices=["client_secret_basic", "client_secret_post"])
    imp = _sub(sub, "import", "config_write key json secret_out",
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
    _sub(sub, "remove", "config_write key json name", "remove a credential",
         "Remove a credential from the config and its keyring items (a file or systemd "
         "secret is left where it is, and named), then reload a running daemon.",
         "  token-broker remove adobe\n")  # fmt: skip
    rot = _sub(sub, "rotate", "config_write key json secret_in name",
               "rotate a secret without downtime",
               "Rotate a keyring secret in two steps while every tool keeps getting tokens: "
               "the new secret (made in the Developer Console) is verified and stored beside "
               "the old one; once the old one is deleted at Adobe, --finish keeps only the "
               "new one. --auto instead runs one automatic cycle through Adobe's I/O "
               "Management API (the credential needs credential_id and console_org_id).",
               "  token-broker rotate adobe\n"
               "  token-broker rotate adobe --finish\n"
               "  token-broker rotate adobe --auto\n")  # fmt: skip
    step = rot.add_mutually_exclusive_group()
    step.add_argument("--finish", action="store_true", help="drop the old secret")
    step.add_argument("--abort", action="store_true", help="drop the new secret")
    step.add_argument(
        "--auto",
        action="store_true",
        help="cycle the secret through Adobe's I/O Management API now (by the daemon if one "
        "runs with this config, else here)",
    )


def _asking_commands(sub: Any) -> None:
    """reload, health, exec (they ask the daemon) and doctor."""

    _sub(sub, "reload", "config daemon key json",
         "make the daemon re-read config and secrets",
         "Ask the running daemon to re-read its config file and secrets, as SIGHUP does: "
         "added credentials start, removed ones stop, changed ones refresh, the others keep "
         "their tokens. A config with an error is refused whole. With client keys it needs a "
         'key whose credentials are "*" -- except from root or the daemon\'s own user over '
         "its unix socket.",
         "  token-broker reload\n"
         "  token-broker reload --key-file /etc/token-broker/admin.key\n")  # fmt: skip
    health = _sub(sub, "health", "config daemon key",
                  "exit 0 if the daemon is healthy (container probes)",
                  "Exit 0 if the daemon answers /healthz (with --ready: /readyz, every "
                  "credential has a servable token), else 1 with the reason on stderr.",
                  "  token-broker health --ready\n")  # fmt: skip
    health.add_argument("--ready", action="store_true", help="ask /readyz instead of /healthz")
    ex = _sub(sub, "exec", "config daemon key name?",
              "run a command with the token in its environment",
              "Run COMMAND with a credential's token in its environment "
              "(TOKEN_BROKER_ACCESS_TOKEN, TOKEN_BROKER_EXPIRES_AT and, for Adobe, "
              "TOKEN_BROKER_API_KEY and TOKEN_BROKER_ORG_ID), as `aws-vault exec` does. The "
              "command goes after `--`. It becomes this process: same pid, its signals and "
              "its exit status.",
              "  token-broker exec adobe -- ./sync-users.sh\n"
              "  token-broker exec --env AUTH=authorization -- my-tool --verbose\n",
              usage="token-broker exec [NAME] [--env VAR=FIELD]... [--min-remaining DUR] "
              "[--pass-key] [--url URL] -- COMMAND [ARG...]")  # fmt: skip
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
    doc = _sub(sub, "doctor", "config json", "check the setup",
               "Check the setup, one line per check: the config file, file modes, the "
               "keyring, listen addresses, TLS files, every credential's secret and, unless "
               "--offline, one token request per credential. Exit 1 when a check fails.",
               "  token-broker doctor\n"
               "  token-broker doctor --offline --json\n")  # fmt: skip
    doc.add_argument("--offline", action="store_true", help="no token requests to issuers")


def _client_commands(sub: Any) -> None:
    """client add, remove, list: the keys tools show the daemon."""
    client = _sub(sub, "client", "", "client keys: who may read which token",
                  "Client keys let each tool read only its own credentials. Once one exists, "
                  "every token and status request needs `Authorization: Bearer KEY`.",
                  "  token-broker client add ci --credentials adobe > ci.key\n"
                  "  token-broker client list\n")  # fmt: skip
    client_sub = client.add_subparsers(dest="client_command", required=True, metavar="ACTION")
    cadd = _sub(client_sub, "add", "config_write key json name",
                "create a client key (printed once)",
                "Create a client key allowed to read the named credentials and print it, "
                "alone on stdout, once: the config keeps only its SHA-256. Adding the first "
                "client makes every other reader need a key too.",
                "  (umask 077; token-broker client add ci --credentials adobe > ci.key)\n"
                "  token-broker client add ops --credentials '*'\n")  # fmt: skip
    cadd.add_argument(
        "--credentials", required=True, help='comma-separated credential names, or "*" for all'
    )
    cadd.add_argument("--replace", action="store_true", help="give an existing client a new key")
    _sub(client_sub, "remove", "config_write key json name", "remove a client",
         "Remove a client from the config: its key stops working once the daemon has "
         "reloaded (this command asks it to).",
         "  token-broker client remove ci\n")  # fmt: skip
    _sub(client_sub, "list", "config json", "show the clients",
         "Show each client and the credentials its key may read, from the config (the keys "
         "themselves are not kept anywhere: only their SHA-256).",
         "  token-broker client list --json\n")  # fmt: skip


def _tls_commands(sub: Any) -> None:
    """tls init, ca: the local CA of the HTTPS listeners (the work is in broker/tls/)."""
    tls = _sub(sub, "tls", "", "the local CA of the HTTPS (IMS) listener",
               "The local CA that signs the certificate of the HTTPS listeners (ims_listen, "
               "tls_listen): create it, and print the files clients must trust.",
               "  token-broker tls init\n"
               "  token-broker tls ca --bundle\n")  # fmt: skip
    tls_sub = tls.add_subparsers(dest="tls_command", required=True, metavar="ACTION")
    _sub(tls_sub, "init", "config", "create the local CA (once)",
         "Create the local CA (an ECDSA key, mode 0600, and a certificate limited to "
         "loopback names) in the state directory; an existing one is left alone.",
         "  token-broker tls init\n")  # fmt: skip
    tls_ca = _sub(tls_sub, "ca", "config", "print the CA certificate's path",
                  "Print the path of the local CA's certificate alone on stdout (with "
                  "--bundle: of a bundle of the system's CAs plus the broker's).",
                  "  export REQUESTS_CA_BUNDLE=$(token-broker tls ca --bundle)\n")  # fmt: skip
    tls_ca.add_argument(
        "--bundle",
        action="store_true",
        help="print instead the path of a bundle of the system's CAs plus the broker's "
        "(for REQUESTS_CA_BUNDLE, which replaces requests' trust store)",
    )
