"""Load and validate the TOML configuration (docs/configuration.md) into the settings.

The frozen pydantic models below *are* the settings the rest of the code
reads: each value is parsed once, here, into the type it is used as (a listen
address into :class:`TcpListen` / :class:`UnixListen`, a secret reference into
:class:`~broker.stores.SecretRef`, a mode string into an int, durations into
seconds), and every default is written once, on its field.

Every error names the file, the key and what was expected, e.g.
``/etc/token-broker/config.toml: [credentials.adobe] scopes: expected a list
of strings``.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from broker import stores
from broker.errors import ConfigError
from broker.net import is_loopback
from broker.providers import PROVIDERS
from broker.schema import (
    NAME_RE,
    CredentialSettings,
    Duration,
    KeyProblem,
    Model,
    RefreshKeys,
    check_ca_file,
    named,
)
from broker.stores import FileMode, SecretRef, file_mode
from broker.variables import EnvFileError, check_env_file

M = TypeVar("M", bound=BaseModel)


# -- listen addresses --------------------------------------------------------------------


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


def parse_listen(item: str, *, allow_remote: bool = False) -> Listen:
    """``HOST:PORT`` on loopback, or ``unix:/path``; anything else is refused.

    With ``allow_remote`` (only valid once client keys exist) any IP address is
    accepted, but never a host name: what is bound must be what is written.
    Raises ValueError with a sentence that quotes ``item``.
    """
    where = repr(item)
    if item.startswith("unix:"):
        path = item[5:]
        if not os.path.isabs(path):
            raise ValueError(f"{where}: a unix socket needs an absolute path")
        return UnixListen(path)
    host, sep, port_text = item.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f'{where}: expected "HOST:PORT" or "unix:/path"')
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    host = "127.0.0.1" if host == "localhost" else host
    if allow_remote:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{where}: expected an IP address, not a host name") from None
    elif not is_loopback(host):  # False for a host name as well
        raise ValueError(
            f"{where}: loopback is required: token-broker listens only on a loopback "
            "address (127.0.0.1, [::1], localhost) or a unix socket "
            "(or set [server] allow_remote = true, which needs [clients.NAME] keys)"
        )
    return TcpListen(host, int(port_text))


# -- the models ----------------------------------------------------------------------------


class ServerSettings(Model):
    """The ``[server]`` table."""

    allow_remote: bool = False  # a non-loopback listen/peer; needs [clients.NAME]
    listen: tuple[Listen, ...] = Field((TcpListen("127.0.0.1", 8765),), min_length=1)
    socket_mode: int = 0o660
    socket_group: str | None = None
    require_header: str = "X-Token-Broker"
    default: str | None = None
    access_log: bool = False
    header_timeout: Duration = Field(10.0, gt=0)  # request headers must arrive within this
    #: HTTPS listeners that look like Adobe IMS (docs/ims-endpoint.md), for tools that
    #: cannot be told to ask a broker; answered from the cache to client keys only.
    ims_listen: tuple[TcpListen, ...] = ()
    #: HTTPS listeners of the main API (the cluster mode of docs/deploy.md).
    tls_listen: tuple[TcpListen, ...] = ()
    #: The certificate and key of the HTTPS listeners; default: a leaf of the local CA.
    tls_cert: str | None = None
    tls_key: str | None = None
    #: How long a leaf of the local CA lives; it is renewed at 2/3 of that, in place.
    tls_leaf_lifetime: Duration = Field(7 * 86400.0, ge=5)

    @field_validator("listen", "ims_listen", "tls_listen", mode="before")
    @classmethod
    def _listen(cls, value: object, info: ValidationInfo) -> object:
        https = info.field_name != "listen"
        shapes = '"HOST:PORT"' if https else '"HOST:PORT" or "unix:/path"'
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"expected a list of {shapes} strings")
        remote = bool(info.data.get("allow_remote"))
        found = tuple(parse_listen(item, allow_remote=remote) for item in value)
        if https and any(isinstance(f, UnixListen) for f in found):
            raise ValueError("HTTPS listens on TCP (HOST:PORT), not on a unix socket")
        return found

    @model_validator(mode="after")
    def _tls_files(self) -> ServerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise KeyProblem("tls_cert", "tls_cert and tls_key go together (or neither)")
        for key in ("tls_cert", "tls_key"):
            if (value := getattr(self, key)) is not None and not os.path.isabs(value):
                raise KeyProblem(key, f"expected an absolute path, got {value!r}")
        https = (*self.ims_listen, *self.tls_listen)
        if self.tls_cert is None and any(not is_loopback(t.host) for t in https):
            raise KeyProblem(
                "tls_cert",
                "a non-loopback HTTPS listener needs tls_cert and tls_key: the local CA "
                "signs loopback names only (its name constraints)",
            )
        bound = [str(x) for x in (*self.listen, *https)]
        if twice := next((b for b in bound if bound.count(b) > 1), None):
            raise KeyProblem("listen", f"{twice} is named twice (listen, ims_listen, tls_listen)")
        return self

    @field_validator("socket_mode", mode="before")
    @classmethod
    def _mode(cls, value: object) -> object:
        if isinstance(value, str):
            if not re.fullmatch(r"0?[0-7]{3}", value):
                raise ValueError(f'expected permission bits such as "0660", got {value!r}')
            return int(value, 8)
        return value


class ClientSettings(Model):
    """One ``[clients.NAME]`` table: who holds a key, and what it may read."""

    name: str
    key_sha256: bytes = Field(repr=False)  # the digest of the key; the key itself is never kept
    credentials: frozenset[str] | None = None  # None: every credential ("*")

    @model_validator(mode="before")
    @classmethod
    def _shape(cls, data: Any, info: ValidationInfo) -> Any:
        data = named(data, info)
        if isinstance(digest := data.get("key_sha256"), str):
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise KeyProblem("key_sha256", "expected 64 lower-case hex digits (a SHA-256)")
            data["key_sha256"] = bytes.fromhex(digest)
        names = data.get("credentials")
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            if not names:
                raise KeyProblem("credentials", 'expected at least one name, or ["*"]')
            known = (info.context or {}).get("credentials", ())
            if "*" not in names and (unknown := [n for n in names if n not in known]):
                raise KeyProblem("credentials", _unknown(unknown[0], known, '; "*" means all'))
            data["credentials"] = None if "*" in names else frozenset(names)
        elif "credentials" not in data:
            raise KeyProblem("credentials", "required key is missing")
        return data


class OutputSettings(Model):
    """One ``[[outputs]]`` table: a file the daemon writes the token into."""

    index: int  # its place in the file, for messages and metrics
    credential: str
    path: str
    format: Literal["token", "json", "headers", "env"] = "token"
    mode: int = 0o600
    group: str | None = None
    command: tuple[str, ...] | None = None  # argv run after every write, no shell

    @model_validator(mode="before")
    @classmethod
    def _shape(cls, data: Any, info: ValidationInfo) -> Any:
        data = named(data, info, "index")
        name = data.get("credential")
        known = (info.context or {}).get("credentials", ())
        if isinstance(name, str) and name not in known:
            raise KeyProblem("credential", _unknown(name, known))
        if isinstance(path := data.get("path"), str):
            if not os.path.isabs(path) or path.endswith("/"):
                raise KeyProblem("path", f"expected an absolute file path, got {path!r}")
            if not os.path.isdir(os.path.dirname(path)):
                raise KeyProblem("path", f"the directory {os.path.dirname(path)} does not exist")
        if isinstance(mode := data.get("mode"), str):
            if not re.fullmatch(r"0?[0-7]{3}", mode) or int(mode, 8) & 0o133:
                raise KeyProblem(
                    "mode",
                    f'expected permission bits such as "0600" or "0640" (at most 0644, '
                    f"never executable or writable by others), got {mode!r}",
                )
            data["mode"] = int(mode, 8)
        if isinstance(group := data.get("group"), str):
            try:
                grp.getgrnam(group)
            except KeyError:
                raise KeyProblem("group", f"no group named {group!r} on this host") from None
        if isinstance(command := data.get("command"), list):
            if not command or not all(isinstance(a, str) and a for a in command):
                raise KeyProblem("command", "expected a non-empty list of strings (an argv)")
            data["command"] = tuple(command)
        return data


def _unknown(name: str, known: Iterable[str], note: str = "") -> str:
    """The sentence for a credential name that is not configured, listing those that are."""
    return f"no credential named {name!r} (configured: {', '.join(sorted(known)) or 'none'}{note})"


#: HOST[:PORT] of a URL: a name or address, or an IPv6 address in brackets; no user.
_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.%]+\]|[A-Za-z0-9._~-]+)(:\d{1,5})?")


class VaultSettings(Model):
    """The ``[vault]`` table: the one Vault (or OpenBao) cluster every ``vault:`` secret is
    in, and how this broker logs in (docs/vault.md)."""

    address: str
    ca_file: str | None = None  # a private CA trusted for Vault only
    namespace: str | None = None  # X-Vault-Namespace
    auth: Literal["token", "approle", "jwt", "kubernetes"]
    token: SecretRef | None = None  # auth = "token" (e.g. Vault Agent's sink file)
    role_id: str | None = None  # auth = "approle"
    secret_id: SecretRef | None = None  # auth = "approle"
    role: str | None = None  # auth = "jwt" | "kubernetes": the Vault role
    jwt: SecretRef | None = None  # auth = "jwt" | "kubernetes" (a projected token file)
    mount: str | None = None  # where the auth method is enabled; default: its name
    poll: Duration = Field(30.0, ge=1)  # look for a new version, and report, this often
    timeout: Duration = Field(10.0, gt=0)  # one call to Vault, connect to last byte

    #: The keys each login method needs (and no other method's).
    NEEDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "token": ("token",), "approle": ("role_id", "secret_id"),
        "jwt": ("role", "jwt"), "kubernetes": ("role", "jwt"),
    }  # fmt: skip

    @model_validator(mode="before")
    @classmethod
    def _refs(cls, data: Any) -> Any:
        data = dict(data)
        for key in ("token", "secret_id", "jwt"):
            if not isinstance(text := data.get(key), str):
                continue
            if text.startswith("vault:"):
                raise KeyProblem(key, "Vault's own login cannot come from Vault")
            try:
                data[key] = stores.parse(text, "vault")
            except ValueError as exc:
                raise KeyProblem(key, str(exc)) from None
        if isinstance(data.get("ca_file"), str):
            check_ca_file(data["ca_file"])
        return data

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        if "@" in value:  # not quoted: it may hold a password
            raise ValueError("expected https://HOST[:PORT] with no user or password in it")
        expected = f"expected https://HOST[:PORT], got {value!r}"
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 (raises for a port out of range)
        except ValueError:
            raise ValueError(expected) from None
        if parts.scheme not in ("https", "http") or not parts.hostname or parts.path.strip("/"):
            raise ValueError(expected)
        odd = any(c.isspace() or not c.isprintable() for c in value)  # urlsplit drops some
        if odd or not _HOST_PORT.fullmatch(parts.netloc) or "?" in value or "#" in value:
            raise ValueError(f"{expected} (no path, query, fragment or spaces)")
        host = parts.hostname
        if parts.scheme == "http" and host != "localhost" and not is_loopback(host):
            # The Vault token and the client secret would cross the network in clear.
            raise ValueError(f"expected an https:// address (http only on loopback), got {value!r}")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _login(self) -> VaultSettings:
        needed = self.NEEDS[self.auth]
        for key in needed:
            if getattr(self, key) is None:
                raise KeyProblem(key, f'auth = "{self.auth}" needs {" and ".join(needed)}')
        # In NEEDS' order, not a set's: the key an error names is the same in every run.
        for key in dict.fromkeys(k for keys in self.NEEDS.values() for k in keys):
            if key not in needed and getattr(self, key) is not None:
                raise KeyProblem(key, f'not used with auth = "{self.auth}"')
        return self


@dataclass(frozen=True)
class Settings:
    """A whole validated configuration: the tables, and the file they came from."""

    server: ServerSettings = field(default_factory=ServerSettings)
    credentials: dict[str, CredentialSettings] = field(default_factory=dict)
    path: Path | None = None
    clients: dict[str, ClientSettings] = field(default_factory=dict)
    outputs: tuple[OutputSettings, ...] = ()
    vault: VaultSettings | None = None

    def file_modes(self) -> list[FileMode]:
        """The config file and every secret file it names (Vault's login too), with what is
        wrong with each (a secret file others may read; a config file others may change:
        they could point ``token_url`` at their own server and receive the secret)."""
        found = [file_mode(self.path, "config file", secret=False)] if self.path else []
        for name, cred in self.credentials.items():
            if (target := cred.secret.file()) is not None:
                found.append(file_mode(target, f"secret file of {name!r}", secret=True))
        for key in ("token", "secret_id", "jwt"):  # Vault's login, a secret as well
            if (ref := getattr(self.vault, key, None)) is not None and (target := ref.file()):
                found.append(file_mode(target, f"[vault] {key} file", secret=True))
        return [f for f in found if f is not None]

    def credential(self, name: str) -> CredentialSettings:
        """The credential ``name`` a command names; ConfigError if there is none."""
        if (found := self.credentials.get(name)) is None:
            raise ConfigError(f"{self.path}: no credential named {name!r}")
        return found

    def default_name(self) -> str | None:
        """The credential served by ``GET /token``."""
        if self.server.default is None and len(self.credentials) == 1:
            return next(iter(self.credentials))
        return self.server.default


@dataclass(frozen=True)
class Changes:
    """What a reload does to the credentials, by name, in the new config's order."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()

    def as_json(self) -> dict[str, list[str]]:
        return {k: list(getattr(self, k)) for k in ("added", "removed", "changed", "unchanged")}


def changes(old: Settings, new: Settings) -> Changes:
    """Plan a reload from ``old`` to ``new``: a pure function of the two settings.

    A credential whose table differs in any key (its refresh keys merged with
    [refresh] included) is changed; the manager refreshes it at once.
    """
    before, after = old.credentials, new.credentials
    return Changes(
        added=tuple(n for n in after if n not in before),
        removed=tuple(n for n in before if n not in after),
        changed=tuple(n for n in after if n in before and before[n] != after[n]),
        unchanged=tuple(n for n in after if n in before and before[n] == after[n]),
    )


# -- loading -----------------------------------------------------------------------------


SYSTEM_CONFIG = Path("/etc/token-broker/config.toml")


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The config file a command reads: ``explicit``, else $TOKEN_BROKER_CONFIG, else the
    user's own file if it exists (so that a user on a host with a system broker can keep
    a config of their own), else the system's."""
    if explicit:
        return Path(explicit)
    if env := os.environ.get("TOKEN_BROKER_CONFIG"):
        return Path(env)
    return next((p for p in (user_config_path(), SYSTEM_CONFIG) if p.exists()), SYSTEM_CONFIG)


def write_path(explicit: str | os.PathLike[str] | None = None, *, euid: int | None = None) -> Path:
    """The config file a command that changes the config (``add``, ``import``...) edits.

    The file :func:`config_path` reads when one exists; when none exists anywhere, the
    one to create: the user's own (``$XDG_CONFIG_HOME/token-broker/config.toml``) for a
    normal user, who cannot write ``/etc`` and whose keyring secrets only their own
    broker can read, and ``/etc/token-broker/config.toml`` for root (the system service).
    """
    found = config_path(explicit)
    if explicit or os.environ.get("TOKEN_BROKER_CONFIG") or found.exists():
        return found
    root = (os.geteuid() if euid is None else euid) == 0
    return SYSTEM_CONFIG if root else user_config_path()


def user_config_path() -> Path:
    """``$XDG_CONFIG_HOME/token-broker/config.toml`` (an unset or relative XDG: ~/.config)."""
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".config"
    return base / "token-broker" / "config.toml"


def load(path: str | os.PathLike[str] | None = None, *, serving: bool = False) -> Settings:
    """Read, parse and validate the config file; raise ConfigError naming file and key.

    ``serving``: the config is for the daemon (start, reload, doctor), which refuses
    one without credentials; commands that only ask a daemon do not care.
    """
    resolved = config_path(path)
    try:
        data = tomllib.loads(resolved.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        if path or os.environ.get("TOKEN_BROKER_CONFIG"):
            named_by = "--config" if path else "$TOKEN_BROKER_CONFIG"
            raise ConfigError(f"{resolved}: config file not found (named by {named_by})") from None
        raise ConfigError(
            f"config file not found: looked in {user_config_path()} and {SYSTEM_CONFIG}; "
            "create one with `token-broker add` or `token-broker import` (or pass --config "
            "PATH, or set TOKEN_BROKER_CONFIG)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{resolved}: cannot read config file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{resolved}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{resolved}: not valid TOML: {exc}") from None
    settings = parse(data, source=str(resolved), path=resolved)
    # A rotate_every needs a secret this process may write: checked for the daemon only, so
    # that a user's `token-broker list` need not be able to write root's secret file.
    for name, cred in settings.credentials.items():
        if serving and cred.cycles_secret and (problem := cred.secret.unwritable()) is not None:
            raise ConfigError(f"{resolved}: [credentials.{name}] rotate_every: {problem}")
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
    tables = ["server", "refresh", "credentials", "clients", "outputs", "vault"]
    if unknown := sorted(set(data) - set(tables)):
        raise ConfigError(
            f"{source}: unknown table or key {unknown[0]!r}{_did_you_mean(unknown[0], tables)} "
            "(expected [server], [refresh], [credentials.NAME], [clients.NAME], [[outputs]] "
            "and [vault])"
        )
    server = _validate(ServerSettings, data.get("server", {}), source, "[server]")
    refresh = _validate(RefreshKeys, data.get("refresh", {}), source, "[refresh]")
    defaults = refresh.model_dump(exclude_unset=True)  # only what [refresh] sets
    credentials: dict[str, CredentialSettings] = {}
    for name, table in _tables(data, "credentials", source).items():
        where = f"[credentials.{name}]"
        # Not a table: any provider's model says "expected a table".
        provider = table.get("provider") if isinstance(table, dict) else "adobe"
        if not isinstance(provider, str) or provider not in PROVIDERS:
            kinds = " or ".join(f'"{p}"' for p in PROVIDERS)
            raise ConfigError(f"{source}: {where} provider: expected {kinds}, got {provider!r}")
        context = {"name": name, "refresh": defaults}
        credentials[name] = _validate(PROVIDERS[provider], table, source, where, context)
    known = {"credentials": credentials}
    clients = {
        name: _validate(ClientSettings, table, source, f"[clients.{name}]", {"name": name, **known})
        for name, table in _tables(data, "clients", source).items()
    }
    if not isinstance(outputs := data.get("outputs", []), list):
        raise ConfigError(f"{source}: outputs: expected [[outputs]] tables")
    parsed = tuple(
        _validate(OutputSettings, table, source, f"[[outputs]] #{i}", {"index": i, **known})
        for i, table in enumerate(outputs, 1)
    )
    paths = [o.path for o in parsed]
    if twice := next((p for p in paths if paths.count(p) > 1), None):
        raise ConfigError(f"{source}: [[outputs]] path: {twice} is written by two outputs")
    for out in (o for o in parsed if o.format == "env"):
        try:
            check_env_file(credentials[out.credential].api_headers("t"))
        except EnvFileError as exc:
            raise ConfigError(f"{source}: [[outputs]] #{out.index} format env: {exc}") from None
    if server.ims_listen and not clients:
        raise ConfigError(
            f"{source}: [server] ims_listen: needs at least one [clients.NAME]: tools there "
            "present a client key as their client_secret (see `token-broker client add`)"
        )
    seen: dict[str, str] = {}  # the IMS-compatible listener picks credentials by client_id
    for name, cred in credentials.items():
        if server.ims_listen and (first := seen.setdefault(cred.client_id, name)) != name:
            raise ConfigError(
                f"{source}: [server] ims_listen: credentials {first!r} and "
                f"{name!r} share the client_id {cred.client_id!r}; with ims_listen a client_id "
                "must pick one credential"
            )
    if server.allow_remote and not clients:
        raise ConfigError(
            f"{source}: [server] allow_remote: needs at least one [clients.NAME] "
            "(remote peers are served only with a client key; see `token-broker client add`)"
        )
    if server.default is not None and server.default not in credentials:
        raise ConfigError(f"{source}: [server] default: {_unknown(server.default, credentials)}")
    vault = _validate(VaultSettings, data["vault"], source, "[vault]") if "vault" in data else None
    for name, cred in credentials.items():
        if cred.secret.needs_vault and vault is None:
            raise ConfigError(
                f"{source}: [credentials.{name}] secret: {cred.secret} needs a [vault] table "
                "(address and login; see docs/vault.md)"
            )
    return Settings(
        server=server,
        credentials=credentials,
        path=path,
        clients=clients,
        outputs=parsed,
        vault=vault,
    )


def _tables(data: dict[str, Any], kind: str, source: str) -> dict[str, Any]:
    if not isinstance(tables := data.get(kind, {}), dict):
        raise ConfigError(f"{source}: {kind}: expected tables [{kind}.NAME]")
    if (bad := next((n for n in tables if not NAME_RE.match(n)), None)) is not None:
        raise ConfigError(
            f"{source}: [{kind}.{bad}]: {kind[:-1]} names may use only letters, "
            "digits, '.', '_' and '-'"
        )
    return tables


#: Fields the loader fills in (from the table's name or place), never written by a user.
_INTERNAL = frozenset({"name", "index"})


def _did_you_mean(key: str, known: list[str]) -> str:
    """`` (did you mean 'scopes'?)`` for a near miss among ``known``, else ""."""
    import difflib

    spelt = key.replace("-", "_").lower()
    if spelt in known:
        return f" (did you mean {spelt!r}? keys are written with '_')"
    close = difflib.get_close_matches(spelt, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


_MESSAGES = {"extra_forbidden": "unknown key", "missing": "required key is missing"}


def _validate(
    model: type[M], value: object, source: str, where: str, context: dict[str, Any] | None = None
) -> M:
    """Validate one table; ConfigError naming the file, the table, the key and the problem."""
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {where}: expected a table")
    try:
        return model.model_validate(value, context=context)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        # An unknown key first: `client-id` is a misspelt `client_id`, not a missing one.
        err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        key = ".".join(str(part) for part in err["loc"])
        msg = _MESSAGES.get(err["type"], err["msg"])
        if err["type"] == "extra_forbidden" and len(err["loc"]) == 1:
            msg += _did_you_mean(key, [k for k in model.model_fields if k not in _INTERNAL])
        msg = msg.replace("Input should be", "expected").replace("Value error, ", "")
        # TOML has arrays; that they become tuples and sets here is ours to know.
        msg = re.sub(r"valid (tuple|frozenset|set)\b", "valid list", msg)
        # No "(got TYPE)" after our own sentences (value_error; a KeyProblem names its key).
        ours = err["type"] == "value_error" or err["type"] in _MESSAGES
        got = "" if ours else f" (got {type(err['input']).__name__})"
        text = f"{where} {key}: {msg}{got}" if key else f"{where} {msg}"
        raise ConfigError(f"{source}: {text}") from None
