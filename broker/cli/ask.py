"""The commands that ask the running daemon: ``token``, ``list``, ``reload``,
``health``, ``exec`` and ``rotate --auto``.

Each asks through :func:`broker.cli.running.asking` (a :mod:`broker.client`
client), which turns the client's errors into the sentences ``main`` prints.
"""

from __future__ import annotations

import argparse
from typing import Any

from broker.cli import Usage, print_result
from broker.cli.running import asking, connect
from broker.errors import BrokerError, ConfigError


def token(args: argparse.Namespace) -> int:
    with asking(args) as broker:
        print(broker.token(args.name))
    return 0


def list_credentials(args: argparse.Namespace) -> int:
    with asking(args) as broker:
        rows = broker.credentials()
    print_result(args, rows, "\n".join(_table(rows)))
    return 0


def _table(rows: list[dict[str, Any]]) -> list[str]:
    """One line per credential, in columns; the last column (the error) is not padded."""
    cycling = any(row.get("secret_cycling") for row in rows)
    vault = any(row.get("vault") for row in rows)
    extra = [*(("SECRET_AGE", "NEXT_CYCLE") if cycling else ()), *(("VAULT",) if vault else ())]
    table = [("NAME", "PROVIDER", "STATE", "EXPIRES_AT", *extra, "LAST_ERROR")]
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
        if vault:
            found = row.get("vault") or {}
            ok = found.get("ok")
            cells.append("-" if not found else f"v{found.get('version')}" if ok else "failing")
            if found and not ok:  # why the secret cannot be re-read, beside what it caused
                last = str(found.get("error")) if last == "-" else f"{last}; {found.get('error')}"
        table.append((*cells, last))
    columns = len(table[0]) - 1
    widths = [max(len(str(r[i])) for r in table) for i in range(columns)]
    return [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1]
        for r in table
    ]


def _age(seconds: float) -> str:
    """A secret's age in the largest whole unit: 45s, 12m, 5h, 83d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def reload(args: argparse.Namespace) -> int:
    with asking(args, admin=True) as broker:
        result = broker.reload()
    text = "; ".join(f"{k}: {', '.join(v) or 'none'}" for k, v in result.items())
    print_result(args, result, f"reloaded ({text})")
    return 0


def health(args: argparse.Namespace) -> int:
    with asking(args) as broker:
        broker.health(ready=args.ready)
    return 0


def exec_command(args: argparse.Namespace) -> int:
    from broker import execcmd
    from broker.schema import parse_duration

    try:
        min_remaining = parse_duration(args.min_remaining)
        asked = execcmd.parse_env(args.env)  # before any request
    except ValueError as exc:  # UsageError included
        raise Usage(f"exec: {exc}") from None
    return execcmd.run(
        connect(args, timeout=5.0),  # the client's own default: a hung daemon fails fast
        args.name,
        args.argv,
        asked=asked,
        min_remaining=min_remaining,
        pass_key=args.pass_key,
    )


def rotate_auto(args: argparse.Namespace) -> int:
    """One secret cycle: asked of the daemon that serves this config, so that
    it never refreshes with a secret being deleted; run here when no daemon answers."""
    from broker import config
    from broker.client import BrokerClientError, BrokerUnavailable
    from broker.providers.adobe import AdobeSettings

    settings = config.load(args.config)
    cred = settings.credential(args.name)
    if not _daemon_answers(args):
        result = _cycle_here(cred, settings)
        where = "no daemon answered: the cycle ran in this process"
    else:
        verify = cred.rotate_verify if isinstance(cred, AdobeSettings) else 0.0
        wait = verify + 6 * cred.policy.timeout + 30
        with asking(args, from_config=True, admin=True, timeout=wait) as broker:
            try:
                result = broker.rotate(args.name)
            except BrokerClientError as exc:
                if exc.status is None and isinstance(exc, BrokerUnavailable):
                    raise BrokerError(f"{exc}; the cycle may still be running: see "
                                      "`token-broker list`") from None  # fmt: skip
                if exc.status == 429:  # rotate_cooldown: the detail says when it may be asked
                    raise BrokerError(f"{args.name} was not cycled: {exc.detail}") from None
                raise  # asking() explains it
        where = "by the running daemon"
    print_result(args, {**result, "where": where},
                 f"cycled {args.name} {where}: {result['detail']}")  # fmt: skip
    return 0


def _daemon_answers(args: argparse.Namespace) -> bool:
    """Whether a daemon answers at this config's address (with anything at all)."""
    from broker.client import BrokerClientError, BrokerUnavailable

    with connect(args, from_config=True) as probe:
        try:
            probe.health()
        except BrokerClientError as exc:
            if exc.status is None and isinstance(exc, BrokerUnavailable):
                return False  # nothing answered there
            if exc.status is None:
                raise  # nothing was asked: e.g. a key file that cannot be read
    return True


def _cycle_here(cred: Any, settings: Any) -> dict[str, Any]:
    """One cycle in this process (no daemon answers): the same steps, state and lock."""
    import asyncio
    import time

    from broker import logs
    from broker.cycling import Cycle, state_store
    from broker.doctor import stores
    from broker.files import state_dir
    from broker.providers.adobe import AdobeSettings
    from broker.upstream import client as issuer_client

    if not isinstance(cred, AdobeSettings) or not cred.cycling:
        raise ConfigError(
            f'credential {cred.name!r}: secret cycling needs provider "adobe", '
            "credential_id and console_org_id (`token-broker import` records both)"
        )
    redactor = logs.Redactor()  # the steps are logged to stderr, through the redaction net
    logs.setup(redactor)

    async def run() -> dict[str, Any]:
        async with stores(settings, lambda t: redactor.set("vault:token", (t,))) as ctx:
            store = cred.secret.writer(cred.name, ctx)
            state = state_store(cred.name, cred, directory=state_dir(), vault=ctx.vault)
            async with issuer_client(cred.policy.timeout, cred.ca_file) as client:
                cycle = Cycle(cred, client=client, store=store, redactor=redactor,
                              state=state, clock=time.time)  # fmt: skip
                return (await cycle.run()).as_json()

    return asyncio.run(run())
