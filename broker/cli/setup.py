"""The commands that change the config and the secrets: ``add``, ``import``,
``remove``, ``rotate`` (by hand; ``--auto`` asks the daemon) and ``client``.

The checks and writes are in :mod:`broker.cli.operations`; this module reads the
command line and the secret, prints what was done and what is left to do, and
asks a running daemon to reload (:func:`broker.cli.running.reload_after_edit`).
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from broker.cli import Usage, print_result, warn
from broker.cli.running import reload_after_edit
from broker.errors import BrokerError, ConfigError

if TYPE_CHECKING:
    from broker.cli.operations import Added
    from broker.configedit import ConfigDocument
    from broker.devconsole import ConsoleCredential


def add(args: argparse.Namespace) -> int:
    from broker.cli import operations

    doc = _document(args)
    # The provider's own settings class judges the table (a missing token_url, an org_id
    # without @AdobeOrg): one place says what each provider needs, for the file and here.
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
    added = operations.add(doc, args.name, table, [secret], check=not args.no_verify,
                            force=args.force, make_default=args.default)  # fmt: skip
    reload = reload_after_edit(args)
    verified = "verified with the issuer, " if not args.no_verify else ""
    where = added.stored.where
    done = "secret stored in" if added.stored.count else "secret to go to"
    lines = [f"added {added.name}: {verified}{done} {where}, {doc.path} "
             f"{'created' if not doc.existed else 'updated'}; {reload.note}",
             *_notes(added)]  # fmt: skip
    print_result(
        args,
        {"added": added.name, "config": str(doc.path), "verified": not args.no_verify,
         "secret": where, "todo": added.stored.todo, "default": added.default,
         "daemon": reload.note, "daemon_reloaded": reload.ok},
        "\n".join(lines),
    )  # fmt: skip
    return reload.exit_status()


def import_project(args: argparse.Namespace) -> int:
    from broker.cli import operations
    from broker.devconsole import default_names, read_console_json

    path = Path(args.file)
    found, refused = read_console_json(path)
    for line in refused:
        warn(f"skipped {line}")
    if not found:
        raise ConfigError(f"{path}: no OAuth Server-to-Server credential to import")
    if args.name and len(found) > 1:
        raise Usage("--name needs a file with one OAuth Server-to-Server credential")
    names = [args.name] if args.name else default_names(found)
    refs = [_secret_ref(args, n, several=len(found) > 1) for n in names]
    doc = _document(args)
    done = operations.import_console(
        doc, found, names, check=not args.no_verify, ims_url=args.ims_url, secret_refs=refs,
        force=args.force, make_default=args.default,
    )  # fmt: skip
    reload = reload_after_edit(args)
    deleted = _offer_delete(args, path, needed=any(a.stored.todo for a in done))
    lines = []
    for a, c in zip(done, found, strict=True):
        lines.append(f"imported {a.name} (from {c.name!r}; {a.stored.count} secret(s) to "
                     f"{a.stored.where}); {_cycling_note(c)}")  # fmt: skip
        lines += _notes(a)
    lines.append(f"{doc.path} {'created' if not doc.existed else 'updated'}; {reload.note}")
    print_result(
        args,
        {"imported": [a.name for a in done], "skipped": refused, "file_deleted": deleted,
         "config": str(doc.path), "daemon": reload.note, "daemon_reloaded": reload.ok,
         "todo": {a.name: a.stored.todo for a in done if a.stored.todo},
         "default": next((a.default for a in done if a.default), None),
         "secret_cycling": {a.name: {"credential_id": c.credential_id,
                                     "console_org_id": c.console_org_id,
                                     "management_api": c.management_api}
                            for a, c in zip(done, found, strict=True)}},
        "\n".join(lines),
    )  # fmt: skip
    return reload.exit_status()


def _cycling_note(found: ConsoleCredential) -> str:
    """Whether the imported credential can cycle its secret, in a sentence."""
    if not (found.credential_id and found.console_org_id):
        return "secret cycling: the file has no credential id or Console org id"
    if not found.management_api:
        return (
            "secret cycling: the project does not list the I/O Management API "
            "(AdobeIOManagementAPISDK); add it in the Developer Console, then set rotate_every"
        )
    return 'secret cycling possible: set rotate_every (e.g. "30d") to turn it on'


def _offer_delete(args: argparse.Namespace, path: Path, *, needed: bool = False) -> bool:
    """Delete the project JSON (it holds the secret in plain text) if the user wants;
    unless ``needed``: a secret is still to be copied out of it (``systemd-creds encrypt``),
    so it is kept whatever was asked, and the user is told to delete it afterwards."""
    warning = f"{path} holds the client secret in plain text"
    if needed:
        warn(f"{warning}: kept for the systemd-creds line above; delete it once the secret "
             "is encrypted")  # fmt: skip
        return False
    if args.delete or args.keep:
        answer = bool(args.delete)
    elif not sys.stdin.isatty():
        warn(f"{warning}: delete it (or pass --delete)")
        answer = False
    else:
        answer = input(f"{warning}. Delete it now? [y/N] ").strip().lower() in ("y", "yes")
    if answer:
        path.unlink()
    return answer


def remove(args: argparse.Namespace) -> int:
    from broker.cli import operations

    removed = operations.remove(_document(args), args.name)
    reload = reload_after_edit(args)
    extra = " (it was the [server] default; that key is gone too)" if removed.was_default else ""
    items = ", ".join(removed.keyring_items) or "none"
    left = f"; its secret, {removed.left}, is left in place" if removed.left else ""
    print_result(
        args,
        {"removed": args.name, "keyring_items": removed.keyring_items, "left": removed.left,
         "daemon": reload.note, "daemon_reloaded": reload.ok},
        f"removed {args.name}{extra}; keyring items deleted: {items}{left}; {reload.note}",
    )  # fmt: skip
    return reload.exit_status()


def rotate(args: argparse.Namespace) -> int:
    from broker.cli import operations

    if args.auto:
        from broker.cli.ask import rotate_auto

        return rotate_auto(args)
    doc = _document(args)
    if args.finish:
        operations.rotate_finish(doc, args.name)
        step, text = "finished", "the old secret is deleted, the new one is the only one"
    elif args.abort:
        operations.rotate_abort(doc, args.name)
        step, text = "aborted", "the new secret is deleted, the old one stays"
    else:
        secret = _read_secret(args, f"New client secret for {args.name}: ")
        operations.rotate_start(doc, args.name, secret, check=not args.no_verify)
        step = "started"
        text = (
            "the new secret is stored beside the old one and in use; after deleting the old "
            f"secret at the issuer, run `token-broker rotate {args.name} --finish`"
        )
    reload = reload_after_edit(args)
    data = {"rotation": step, "name": args.name, "daemon": reload.note,
            "daemon_reloaded": reload.ok}  # fmt: skip
    print_result(args, data, f"rotation of {args.name} {step}: {text}; {reload.note}")
    return reload.exit_status()


def client(args: argparse.Namespace) -> int:
    from broker import access

    doc = _document(args)
    if args.client_command == "list":
        clients = {n: list(table.get("credentials", [])) for n, table in doc.clients().items()}
        text = "\n".join(f"{n}: {', '.join(c)}" for n, c in clients.items()) or "no clients"
        print_result(args, {"clients": clients}, text)
        return 0
    if args.client_command == "remove":
        doc.remove_client(args.name)
        doc.write()
        reload = reload_after_edit(args)
        data = {"removed": args.name, "daemon": reload.note, "daemon_reloaded": reload.ok}
        print_result(args, data, f"removed client {args.name}; {reload.note}")
        return reload.exit_status()
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
    reload = reload_after_edit(args)
    tightened = _private_stdout()
    if args.json:
        print(json.dumps({"client": args.name, "key": key, "credentials": names,
                          "daemon": reload.note, "daemon_reloaded": reload.ok}))  # fmt: skip
    else:
        print(key)  # alone on stdout, so KEY=$(token-broker client add ...) works
    warn(f"client {args.name} may read {', '.join(names)}; this key is shown only now (the "
         f"config keeps its SHA-256); {reload.note}")  # fmt: skip
    if tightened:
        warn(f"{tightened} holds a key: made it mode 0600")
    if first:
        warn(
            "this is the first client key: from now on every token and status request needs "
            "one (`curl /token` without Authorization: Bearer KEY is 401), so give each tool "
            "on this host its key, or a key file in $TOKEN_BROKER_CLIENT_KEY_FILE"
        )
    return reload.exit_status()


def _private_stdout() -> str | None:
    """Make stdout's file 0600 when others may read it (``> key.txt``); its path, if so.
    The key goes to stdout so that a user can redirect it; a shell creates that file
    with its umask, usually 0644."""
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


# -- reading the command line and the secret ---------------------------------------


def _document(args: argparse.Namespace) -> ConfigDocument:
    from broker.config import write_path
    from broker.configedit import ConfigDocument

    return ConfigDocument(write_path(args.config))


def _read_secret(args: argparse.Namespace, prompt: str) -> str:
    if args.secret_stdin:
        return sys.stdin.read().removesuffix("\n")
    import getpass

    if not sys.stdin.isatty():
        raise BrokerError("no terminal to prompt for the secret: pass --secret-stdin")
    return getpass.getpass(prompt)


def _secret_ref(args: argparse.Namespace, name: str, several: bool = False) -> str | None:
    """The ``secret = …`` of a new credential from --secret (None: the default, keyring).
    ``file:~/x`` and a relative ``file:x`` are made absolute here, as a shell would not;
    ``file:DIR/`` and a bare ``systemd`` name one place per credential."""
    text: str | None = getattr(args, "secret", None)
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


def _notes(added: Added) -> list[str]:
    """What the user still has to do for the secret (systemd: encrypt it for the service),
    and a warning when this addition wrote ``[server] default``."""
    lines = []
    if added.stored.todo:
        encrypt, load = added.stored.todo
        lines += [
            f"  {encrypt}    # as root; reads the client secret on stdin: paste it, then Ctrl-D",
            f"  and in the unit (systemctl edit token-broker): {load}",
        ]
    if added.default == added.name:
        lines.append(f"{added.name} is now the [server] default: GET /token serves it")
    elif added.default is not None:
        lines.append(
            f'[server] default = "{added.default}" written: GET /token, `token-broker token` and '
            f"TokenBroker().token() keep serving {added.default}; ask for the new one by name "
            f"(/token/{added.name}), or pass --default to make it the default"
        )
    return lines
