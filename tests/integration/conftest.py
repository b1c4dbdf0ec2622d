"""Fixtures that run the broker as a process against the loopback issuer."""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import BrokerProcess, IssuerThread, config_file, new_secret, reserve_port


@dataclass
class Running:
    proc: BrokerProcess
    url: str
    port: int
    secret: str


StartBroker = Callable[..., Running]


@pytest.fixture
def start_broker(issuer: IssuerThread, tmp_path: Path) -> Iterator[StartBroker]:
    """Start ``token-broker serve`` with one credential ``main`` (and any extra TOML).

    At teardown the process is stopped and its whole output is searched for
    the secret and for every token the issuer handed out: none may appear.
    """
    started: list[Running] = []

    def start(
        credential: str = "",
        *,
        provider: str = "adobe",
        extra: str = "",
        server: str = "",
        refresh: str = "",
        register: bool = True,
        wait: bool = True,
        env: dict[str, str] | None = None,
        issuer_url: str | None = None,
        other_issuer: IssuerThread | None = None,
        args: tuple[str, ...] = (),
        listen: tuple[str, ...] = (),
        scopes: tuple[str, ...] = ("openid", "AdobeID"),
    ) -> Running:
        secret = new_secret()
        secret_file = tmp_path / f"secret-{len(started)}"
        secret_file.write_text(secret + "\n")
        secret_file.chmod(0o600)
        target = other_issuer or issuer
        if register:
            target.issuer.add_client("broker-client", secret)
        port = reserve_port()
        url = issuer_url or target.url
        main = {
            "provider": provider,
            "client_id": "broker-client",
            "scopes": list(scopes),
            "secret": f"file:{secret_file}",
        }
        if provider == "adobe":
            main |= {"ims_url": url, "org_id": "ABC@AdobeOrg"}
        else:
            main["token_url"] = f"{url}/oauth2/token"
        # The TOML fragments go where they stood in the file: in their section.
        config = config_file(
            tmp_path / f"config-{len(started)}.toml",
            {"main": main | tomllib.loads(credential)},
            server={"listen": [f"127.0.0.1:{port}", *listen]} | tomllib.loads(server),
            refresh=tomllib.loads(refresh),
            toml=extra,
        )
        proc = BrokerProcess(config, env=env, args=args)
        running = Running(proc, f"http://127.0.0.1:{port}", port, secret)
        started.append(running)
        if wait:
            running.proc.wait_healthy(running.url)
        return running

    yield start
    for running in started:
        running.proc.stop()
        out = running.proc.output()
        assert running.secret not in out, "the secret appeared in the broker's output"
        for token in issuer.issuer.issued:
            assert token not in out, "a whole token appeared in the broker's output"
