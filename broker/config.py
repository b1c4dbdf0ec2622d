"""Load and validate the TOML configuration (DESIGN §3) into typed settings.

Every error names the file, the key and what was expected, e.g.
``/etc/token-broker/config.toml: [credentials.adobe] scopes: expected a list
of strings``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from broker.errors import ConfigError
from broker.tokens import RefreshPolicy

M = TypeVar("M", bound=BaseModel)
NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
DEFAULT_LISTEN = "127.0.0.1:8765"
DEFAULT_IMS_URL = "https://ims-na1.adobelogin.com"
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_duration(value: object) -> float:
    """``"90s"``, ``"5m"``, ``"2h"``, ``"1d"``, ``"250ms"`` or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError('expected a duration such as "90s", "5m" or a number of seconds')
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    else:
        raise ValueError('expected a duration such as "90s", "5m" or a number of seconds')
    if seconds < 0:
        raise ValueError("expected a duration of zero or more seconds")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _RefreshKeys(_Strict):
    at: float | None = Field(None, gt=0, lt=1)
    jitter: float | None = Field(None, ge=0, lt=0.5)
    min_remaining: Duration | None = None
    retry_initial: Duration | None = Field(None, gt=0)
    retry_max: Duration | None = Field(None, gt=0)
    timeout: Duration | None = Field(None, gt=0)
    force_cooldown: Duration | None = None


class _Server(_Strict):
    listen: list[str] = Field(default_factory=lambda: [DEFAULT_LISTEN], min_length=1)
    socket_mode: str = Field("0660", pattern=r"^0?[0-7]{3}$")
    socket_group: str | None = None
    require_header: str = "X-Token-Broker"
    default: str | None = None
    allow_remote: bool = False
    access_log: bool = False
    header_timeout: Duration = Field(10.0, gt=0)


class _Client(_Strict):
    key_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    credentials: list[str] = Field(min_length=1)


class _CredentialBase(_RefreshKeys):
    client_id: str = Field(min_length=1)
    scopes: list[str] = Field(default_factory=list)
    secret: str = "keyring"
    allow_uids: list[Annotated[int, Field(ge=0)]] | None = None
    allow_gids: list[Annotated[int, Field(ge=0)]] | None = None
    ca_file: str | None = None


class _Adobe(_CredentialBase):
    provider: Literal["adobe"]
    org_id: str | None = None
    ims_url: str = DEFAULT_IMS_URL


class _OAuth2(_CredentialBase):
    provider: Literal["oauth2"]
    token_url: str
    auth_method: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"
    params: dict[str, str] = Field(default_factory=dict)


_PROVIDERS: dict[str, type[_CredentialBase]] = {"adobe": _Adobe, "oauth2": _OAuth2}


@dataclass(frozen=True)
class TcpListen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class UnixListen:
    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"


Listen = TcpListen | UnixListen


@dataclass(frozen=True)
class ServerSettings:
    listen: tuple[Listen, ...] = (TcpListen("127.0.0.1", 8765),)
    socket_mode: int = 0o660
    socket_group: str | None = None
    require_header: str = "X-Token-Broker"
    default: str | None = None
    allow_remote: bool = False  # a non-loopback listen/peer; needs [clients.NAME]
    access_log: bool = False
    header_timeout: float = 10.0  # a connection must send its request headers within this


@dataclass(frozen=True)
class ClientSettings:
    """One ``[clients.NAME]`` table: who holds a key, and what it may read."""

    name: str
    key_sha256: bytes = field(repr=False)  # the digest of the key; the key itself is never kept
    credentials: frozenset[str] | None = None  # None: every credential ("*")


@dataclass(frozen=True)
class CredentialSettings:
    """One ``[credentials.NAME]`` table, with the refresh policy already merged."""

    name: str
    provider: str
    client_id: str
    scopes: tuple[str, ...] = ()
    secret: str = "keyring"
    org_id: str | None = None
    ims_url: str = DEFAULT_IMS_URL
    token_url: str | None = None
    auth_method: str = "client_secret_basic"
    params: tuple[tuple[str, str], ...] = ()
    policy: RefreshPolicy = field(default_factory=RefreshPolicy)
    # Unix-socket peers allowed to read this credential (SO_PEERCRED); None: no restriction.
    allow_uids: frozenset[int] | None = None
    allow_gids: frozenset[int] | None = None
    ca_file: str | None = None  # a private CA that alone is trusted for this issuer

    @property
    def peer_restricted(self) -> bool:
        return self.allow_uids is not None or self.allow_gids is not None


@dataclass(frozen=True)
class Settings:
    server: ServerSettings
    credentials: dict[str, CredentialSettings]
    path: Path | None = None
    clients: dict[str, ClientSettings] = field(default_factory=dict)

    def default_name(self) -> str | None:
        """The credential served by ``GET /token``."""
        if self.server.default is not None:
            return self.server.default
        if len(self.credentials) == 1:
            return next(iter(self.credentials))
        return None


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Resolve the config file as DESIGN §2 says.

    ``--config``, else ``$TOKEN_BROKER_CONFIG``, else the XDG user config if
    it exists, else ``/etc/token-broker/config.toml``.
    """
    if explicit:
        return Path(explicit)
    if env := os.environ.get("TOKEN_BROKER_CONFIG"):
        return Path(env)
    xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(Path.home(), ".config")
    user = Path(xdg) / "token-broker" / "config.toml"
    if user.exists():
        return user
    return Path("/etc/token-broker/config.toml")


def load(path: str | os.PathLike[str] | None = None, *, serving: bool = False) -> Settings:
    """Read, parse and validate the config file; raise ConfigError naming file and key.

    ``serving``: the config is for the daemon (start, reload, doctor), which refuses
    one without credentials; commands that only ask a daemon do not care.
    """
    resolved = config_path(path)
    try:
        raw = resolved.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{resolved}: config file not found (pass --config PATH or set TOKEN_BROKER_CONFIG)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{resolved}: cannot read config file: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{resolved}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{resolved}: not valid TOML: {exc}") from None
    settings = parse(data, source=str(resolved), path=resolved)
    if serving and not settings.credentials:
        # An empty file is more often a truncated write or an editor's empty save than
        # a wish to serve nothing: refusing it keeps a reload from dropping every token.
        raise ConfigError(
            f"{resolved}: no credentials are configured (no [credentials.NAME] table); "
            "a broker with nothing to serve is refused: add one (`token-broker add`) "
            "or stop the daemon"
        )
    return settings


def parse(data: dict[str, Any], *, source: str = "<config>", path: Path | None = None) -> Settings:
    """Validate an already-parsed TOML document."""
    unknown = sorted(set(data) - {"server", "refresh", "credentials", "clients"})
    if unknown:
        raise ConfigError(
            f"{source}: unknown table or key {unknown[0]!r} "
            "(expected [server], [refresh], [credentials.NAME] and [clients.NAME])"
        )
    server = _validate(_Server, data.get("server", {}), source, "[server]")
    defaults = _validate(_RefreshKeys, data.get("refresh", {}), source, "[refresh]")
    base_policy = _merge_policy(RefreshPolicy(), defaults)

    creds_raw = data.get("credentials", {})
    if not isinstance(creds_raw, dict):
        raise ConfigError(f"{source}: credentials: expected tables [credentials.NAME]")
    credentials = {
        name: _credential(name, table, base_policy, source) for name, table in creds_raw.items()
    }
    clients_raw = data.get("clients", {})
    if not isinstance(clients_raw, dict):
        raise ConfigError(f"{source}: clients: expected tables [clients.NAME]")
    clients = {
        name: _client(name, table, credentials, source) for name, table in clients_raw.items()
    }
    if server.allow_remote and not clients:
        raise ConfigError(
            f"{source}: [server] allow_remote: needs at least one [clients.NAME] "
            "(remote peers are served only with a client key; see `token-broker client add`)"
        )
    settings = ServerSettings(
        listen=tuple(
            parse_listen(item, source, allow_remote=server.allow_remote) for item in server.listen
        ),
        socket_mode=int(server.socket_mode, 8),
        socket_group=server.socket_group,
        require_header=server.require_header,
        default=server.default,
        allow_remote=server.allow_remote,
        access_log=server.access_log,
        header_timeout=server.header_timeout,
    )
    if settings.default is not None and settings.default not in credentials:
        raise ConfigError(
            f"{source}: [server] default: no credential named {settings.default!r} "
            f"(configured: {', '.join(sorted(credentials)) or 'none'})"
        )
    return Settings(server=settings, credentials=credentials, path=path, clients=clients)


def _client(
    name: str, table: object, credentials: dict[str, CredentialSettings], source: str
) -> ClientSettings:
    where = f"[clients.{name}]"
    if not NAME_RE.match(name):
        raise ConfigError(
            f"{source}: {where}: client names may use only letters, digits, '.', '_' and '-'"
        )
    model = _validate(_Client, table, source, where)
    if "*" in model.credentials:
        allowed = None
    else:
        unknown = [c for c in model.credentials if c not in credentials]
        if unknown:
            raise ConfigError(
                f"{source}: {where} credentials: no credential named {unknown[0]!r} "
                f'(configured: {", ".join(sorted(credentials)) or "none"}; "*" means all)'
            )
        allowed = frozenset(model.credentials)
    return ClientSettings(name, bytes.fromhex(model.key_sha256), allowed)


def _credential(name: str, table: object, base: RefreshPolicy, source: str) -> CredentialSettings:
    where = f"[credentials.{name}]"
    if not NAME_RE.match(name):
        raise ConfigError(
            f"{source}: {where}: credential names may use only letters, digits, '.', '_' and '-'"
        )
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: {where}: expected a table")
    provider = table.get("provider")
    if provider not in _PROVIDERS:
        raise ConfigError(
            f'{source}: {where} provider: expected "adobe" or "oauth2", got {provider!r}'
        )
    model = _validate(_PROVIDERS[provider], table, source, where)
    check_secret_reference(model.secret, f"{source}: {where} secret")
    if model.ca_file is not None:
        check_ca_file(model.ca_file, f"{source}: {where} ca_file")
    extra: dict[str, Any] = {}
    if isinstance(model, _Adobe):
        extra = {"org_id": model.org_id, "ims_url": model.ims_url.rstrip("/")}
    elif isinstance(model, _OAuth2):
        extra = {
            "token_url": model.token_url,
            "auth_method": model.auth_method,
            "params": tuple(model.params.items()),
        }
    return CredentialSettings(
        name=name,
        provider=provider,
        client_id=model.client_id,
        scopes=tuple(model.scopes),
        secret=model.secret,
        policy=_merge_policy(base, model),
        allow_uids=None if model.allow_uids is None else frozenset(model.allow_uids),
        allow_gids=None if model.allow_gids is None else frozenset(model.allow_gids),
        ca_file=model.ca_file,
        **extra,
    )


def _merge_policy(base: RefreshPolicy, keys: _RefreshKeys) -> RefreshPolicy:
    values = {f.name: getattr(base, f.name) for f in fields(RefreshPolicy)}
    for name in values:
        override = getattr(keys, name)
        if override is not None:
            values[name] = float(override)
    return RefreshPolicy(**values)


_SECRET_KINDS = ("keyring", "keyring:", "systemd:", "file:", "env:")


def check_secret_reference(ref: str, where: str) -> None:
    """Reject a malformed secret reference at load time, before anything runs."""
    ok = ref == "keyring" or (
        ref.startswith(_SECRET_KINDS[1:]) and ref.split(":", 1)[1].strip() != ""
    )
    if ok and ref.startswith("keyring:"):
        ok = "/" in ref[8:] and all(ref[8:].split("/", 1))
    if ok and ref.startswith("file:"):
        ok = os.path.isabs(ref[5:])
    if not ok:
        raise ConfigError(
            f'{where}: expected "keyring", "keyring:SERVICE/USERNAME", "systemd:NAME", '
            f'"file:/absolute/path" or "env:VAR", got {ref!r}'
        )


def check_ca_file(path: str, where: str) -> None:
    """A ``ca_file`` must be an absolute path to PEM certificates that load."""
    import ssl

    if not os.path.isabs(path):
        raise ConfigError(f"{where}: expected an absolute path, got {path!r}")
    try:
        ssl.create_default_context(cafile=path)
    except FileNotFoundError:
        raise ConfigError(f"{where}: {path} does not exist") from None
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        raise ConfigError(f"{where}: {path} holds no usable PEM certificate ({reason})") from None


def parse_listen(item: str, source: str = "<config>", *, allow_remote: bool = False) -> Listen:
    """``HOST:PORT`` on loopback, or ``unix:/path``; anything else is refused.

    With ``allow_remote`` (only valid once client keys exist) any IP address is
    accepted, but never a host name: what is bound must be what is written.
    """
    where = f"{source}: [server] listen {item!r}"
    if item.startswith("unix:"):
        path = item[5:]
        if not os.path.isabs(path):
            raise ConfigError(f"{where}: a unix socket needs an absolute path")
        return UnixListen(path)
    host, sep, port_text = item.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f'{where}: expected "HOST:PORT" or "unix:/path"')
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is None and allow_remote:
        raise ConfigError(f"{where}: expected an IP address, not a host name")
    if not allow_remote and (address is None or not address.is_loopback):
        raise ConfigError(
            f"{where}: loopback is required: token-broker listens only on a loopback "
            "address (127.0.0.1, [::1], localhost) or a unix socket "
            "(or set [server] allow_remote = true, which needs [clients.NAME] keys)"
        )
    return TcpListen(host, int(port_text))


_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
}


def _validate(model: type[M], value: object, source: str, where: str) -> M:
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {where}: expected a table")
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        key = ".".join(str(part) for part in err["loc"])
        msg = _MESSAGES.get(err["type"], err["msg"])
        msg = msg.replace("Input should be", "expected").replace("Value error, ", "")
        got = "" if err["type"] in _MESSAGES else f" (got {type(err['input']).__name__})"
        raise ConfigError(f"{source}: {where} {key}: {msg}{got}") from None
