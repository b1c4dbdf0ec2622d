"""The fenced blocks of README.md and docs/*.md, and a sandbox to run them in.

A block may carry a marker on the line before its opening fence:

* ``<!-- test: NAME -->``: a test of its own runs it (it calls ``block("NAME")``;
  tests/test_docs.py checks that every such name is claimed by a test);
* ``<!-- skip: REASON -->``: it cannot run here; its test is skipped, saying why.

Every other block is checked by its language in tests/test_docs.py: ``sh`` and
``python`` blocks run in a :class:`Sandbox` (a real broker serving the
credentials the docs use, with a local issuer and a stand-in for Adobe's User
Management API), ``toml`` blocks load as a config, ``yaml``, ``json`` and
``promql`` blocks are parsed or evaluated. What a sandbox changes in a block
before running it is listed in :data:`SANDBOX_SUBSTITUTIONS`: the broker's
address and Adobe's API host, nothing else.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from helpers import BrokerProcess, IssuerThread, config_file, new_secret, wait_for
from standin import StandInApi

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(
    r"^(?:<!-- (?P<kind>test|skip): (?P<arg>.*?) -->\n)?```(?P<lang>[a-z]*)\n(?P<body>.*?)^```$",
    re.M | re.S,
)
CLIENT_ID = "0123456789abcdef0123456789abcdef"
ORG = "ABCDEF0123456789ABCDEF01@AdobeOrg"


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    body: str
    kind: str | None  # "test", "skip" or None
    arg: str  # the test's name, or the reason to skip

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(paths: list[Path] | None = None) -> list[Block]:
    found = []
    for path in paths or FILES:
        text = path.read_text()
        for m in _FENCE.finditer(text):
            line = text.count("\n", 0, m.start("lang")) + 1
            found.append(Block(path, line, m["lang"], m["body"], m["kind"], m["arg"] or ""))
    return found


def block(name: str) -> str:
    """The body of the one block marked ``<!-- test: NAME -->``."""
    found = [b for b in blocks() if b.kind == "test" and b.arg == name]
    assert len(found) == 1, f"{len(found)} blocks are marked test: {name}"
    return found[0].body


def commands(body: str) -> list[str]:
    """The shell commands of a block: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    joined = re.sub(r"\|\n\s*", "| ", joined)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


#: (text in a block, what the sandbox puts there): its broker's address, its unix
#: socket, and the stand-in for Adobe's User Management API.
SANDBOX_SUBSTITUTIONS = ("127.0.0.1:8765", "/run/token-broker/broker.sock",
                         "https://usermanagement.adobe.io")  # fmt: skip


@dataclass
class Sandbox:
    """A broker as a user has it: a config in ~/.config, credentials `adobe` (the default)
    and `partner`, a unix socket, and the commands on PATH; HOME is a fresh directory."""

    home: Path
    port: int
    socket: Path
    api: StandInApi
    issuer: IssuerThread
    broker: BrokerProcess
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config(self) -> Path:
        return self.home / ".config" / "token-broker" / "config.toml"

    def adapt(self, text: str) -> str:
        replacements = dict(zip(SANDBOX_SUBSTITUTIONS, (f"127.0.0.1:{self.port}",
                            str(self.socket), self.api.url), strict=True))  # fmt: skip
        for old, new in replacements.items():
            text = text.replace(old, new)
        return text

    def sh(self, body: str, *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a block with bash -e (every command must succeed) in the sandbox."""
        return subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", self.adapt(body)],
            capture_output=True, text=True, env=self.env, cwd=self.home, timeout=timeout,
        )  # fmt: skip

    def python(self, body: str, *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-"], input=self.adapt(body),
            capture_output=True, text=True, env=self.env, cwd=self.home, timeout=timeout,
        )  # fmt: skip


@contextmanager
def system_config_untouched() -> Iterator[None]:
    """Fail a test that leaves /etc/token-broker/config.toml behind (and remove it).

    Root's `add` and `import` write the system config when no other exists: tests that
    run them as root give them a config of the user's first, and this catches one that
    does not, before it disturbs every later test on the machine.
    """
    from broker.config import SYSTEM_CONFIG

    existed = SYSTEM_CONFIG.exists()
    made_dir = not SYSTEM_CONFIG.parent.exists()
    yield
    if existed or not SYSTEM_CONFIG.exists():
        return
    SYSTEM_CONFIG.unlink()
    if made_dir:
        shutil.rmtree(SYSTEM_CONFIG.parent, ignore_errors=True)
    raise AssertionError(f"the test wrote {SYSTEM_CONFIG} (removed again)")


def users_config(home: Path) -> Path:
    """An empty config of the user's own, so that root's commands edit it, not /etc's."""
    path = home / ".config" / "token-broker" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    return path


def userns_works() -> bool:
    """Whether this host lets us run a command as uid 1000 in a user namespace."""
    if not shutil.which("unshare"):
        return False
    try:
        done = subprocess.run(
            ["unshare", "--user", "--map-user=1000", "--map-group=1000", "id", "-u"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and done.stdout.strip() == "1000"


def as_uid_1000(argv: list[str]) -> list[str]:
    """``argv`` run as uid 1000 in a user namespace; skip (fail in CI) where impossible."""
    import pytest

    if not userns_works():
        if os.environ.get("CI") == "true":
            pytest.fail("CI runs as root with user namespaces (unshare --user)")
        pytest.skip("user namespaces are not available here (unshare --user)")
    return ["unshare", "--user", "--map-user=1000", "--map-group=1000", *argv]


def user_env(home: Path) -> dict[str, str]:
    """An environment of a user with ``home``: token-broker and python on PATH (this
    checkout's), nothing of ours configured, no keyring session, XDG under home."""
    bin_dir = home / ".local" / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "token-broker"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m broker "$@"\n')
    script.chmod(0o755)
    real_curl = shutil.which("curl")
    if real_curl:  # an HTTP error fails the block, as a reader would notice it
        strict = bin_dir / "curl"
        strict.write_text(f'#!/bin/sh\nexec "{real_curl}" --fail-with-body "$@"\n')
        strict.chmod(0o755)
    for name in ("python", "python3"):  # this interpreter, as the virtualenv's would be
        wrapper = bin_dir / name
        wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TOKEN_BROKER_", "DBUS_", "REQUESTS_CA_BUNDLE"))}  # fmt: skip
    env.pop("PYTHON_KEYRING_BACKEND", None)
    env.update(
        HOME=str(home),
        PATH=f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_STATE_HOME=str(home / ".local" / "state"),
        PYTHONPATH=str(ROOT),  # this checkout's broker, also where an installed one exists
    )
    return env


@contextmanager
def sandbox() -> Iterator[Sandbox]:
    from helpers import reserve_port

    issuer = IssuerThread().start()
    api = StandInApi(lambda: issuer.issuer.issued, CLIENT_ID, ORG).start()
    tmp = Path(tempfile.mkdtemp(prefix="tb-docs-", dir="/tmp"))  # short: a unix socket
    try:
        home = tmp / "home"
        home.mkdir()
        secrets_dir = home / ".config" / "token-broker"
        secrets_dir.mkdir(parents=True, mode=0o700)
        adobe, partner = new_secret(), new_secret()
        issuer.issuer.add_client(CLIENT_ID, adobe)
        issuer.issuer.add_client("broker", partner)
        for name, value in (("adobe", adobe), ("partner", partner)):
            (secrets_dir / f"{name}.secret").write_text(value + "\n")
            (secrets_dir / f"{name}.secret").chmod(0o600)
        port = reserve_port()
        sock = tmp / "broker.sock"
        config = config_file(
            secrets_dir / "config.toml",
            {
                "adobe": {
                    "provider": "adobe",
                    "client_id": CLIENT_ID,
                    "org_id": ORG,
                    "scopes": ["openid", "AdobeID", "user_management_sdk"],
                    "ims_url": issuer.url,
                    "secret": f"file:{secrets_dir}/adobe.secret",
                },
                "partner": {
                    "provider": "oauth2",
                    "client_id": "broker",
                    "token_url": f"{issuer.url}/oauth2/token",
                    "secret": f"file:{secrets_dir}/partner.secret",
                },
            },
            server={"listen": [f"127.0.0.1:{port}", f"unix:{sock}"], "default": "adobe"},
        )
        env = user_env(home)
        broker = BrokerProcess(config, env={"XDG_STATE_HOME": env["XDG_STATE_HOME"]})
        try:
            broker.wait_healthy(f"http://127.0.0.1:{port}")
            wait_for(
                lambda: httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200,
                what="the sandbox broker's tokens",
            )  # fmt: skip
            env["TOKEN_BROKER_URL"] = f"http://127.0.0.1:{port}"
            yield Sandbox(home, port, sock, api, issuer, broker, env)
        finally:
            broker.stop()
            out = broker.output()
            assert adobe not in out and partner not in out
    finally:
        api.stop()
        issuer.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def project_json(path: Path, secret: str, *, name: str = "usersync", cycling: bool = False) -> Path:
    """A Developer Console project download, as `import` reads it."""
    details: dict[str, object] = {
        "credentials": [{
            "id": "4566206088345", "name": "Credential in Production",
            "integration_type": "oauth_server_to_server",
            "oauth_server_to_server": {
                "client_id": CLIENT_ID, "client_secrets": [secret],
                "technical_account_id": "TA@techacct.adobe.com",
                "technical_account_email": "ta@techacct.adobe.com",
                "scopes": ["openid", "AdobeID", "user_management_sdk"],
            },
        }],
    }  # fmt: skip
    if cycling:
        details["services"] = [{"code": "AdobeIOManagementAPISDK", "name": "I/O Management API"}]
    data = {"project": {"id": "4566206088344", "name": name, "title": "User Sync",
                       "org": {"id": "98765", "name": "Org", "ims_org_id": ORG},
                       "workspace": {"id": "4566206088346", "name": "Production",
                                     "details": details}}}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path
