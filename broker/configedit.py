"""Edit the config file in place, keeping comments and everything else intact.

Used only by the CLI commands that change the config (``add``, ``import``,
``remove``, ``client``). Every change is validated as a whole config before anything is
written, and the write is atomic (:func:`broker.files.atomic_write`), so a failure
leaves the old file exactly as it was.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.exceptions import TOMLKitError

from broker import config
from broker.errors import ConfigError
from broker.files import atomic_write
from broker.schema import NAME_RE


class ConfigDocument:
    """A config file as a tomlkit document, with its path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.exists = path.exists()
        self.existed = self.exists  # before this command: "created" or "updated"
        try:
            text = path.read_text(encoding="utf-8") if self.exists else ""
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise ConfigError(f"{path}: cannot read config file: {reason}") from None
        try:
            self.doc = tomlkit.parse(text)
        except TOMLKitError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        self.validate()  # refuse to edit a file that is already broken

    def validate(self) -> config.Settings:
        return config.parse(self.doc.unwrap(), source=str(self.path), path=self.path)

    def credentials(self) -> dict[str, Any]:
        return dict(self.doc.get("credentials", {}))

    def add_credential(self, name: str, table: dict[str, Any]) -> None:
        if name in self.credentials():
            raise ConfigError(f"{self.path}: a credential named {name!r} exists already")
        self._put("credentials", name, {k: v for k, v in table.items() if v is not None})

    def remove_credential(self, name: str) -> bool:
        """Remove ``[credentials.NAME]``; return True if it was the ``[server] default``."""
        if name not in self.credentials():
            raise ConfigError(f"{self.path}: no credential named {name!r}")
        del self.doc["credentials"][name]
        if was_default := self.default() == name:
            del self.doc["server"]["default"]
        self.validate()
        return was_default

    def clients(self) -> dict[str, Any]:
        return dict(self.doc.get("clients", {}))

    def set_client(self, name: str, key_sha256: str, credentials: list[str]) -> bool:
        """Add ``[clients.NAME]`` or replace its key; return True if it existed."""
        existed = name in self.clients()
        self._put("clients", name, {"key_sha256": key_sha256, "credentials": credentials})
        return existed

    def _put(self, section: str, name: str, values: dict[str, Any]) -> None:
        """Write ``[SECTION.NAME]`` (a credential, a client) with ``values``."""
        what = section.removesuffix("s")
        if not NAME_RE.match(name):
            raise ConfigError(
                f"invalid {what} name {name!r}: use only letters, digits, '.', '_' and '-'"
            )
        entry = tomlkit.table()
        entry.update(values)
        self.doc.setdefault(section, tomlkit.table(is_super_table=True))[name] = entry
        self.validate()

    def remove_client(self, name: str) -> None:
        if name not in self.clients():
            raise ConfigError(f"{self.path}: no client named {name!r}")
        del self.doc["clients"][name]
        if not self.doc["clients"]:
            del self.doc["clients"]
        self.validate()

    def default(self) -> str | None:
        value = self.doc.get("server", {}).get("default")
        return value if isinstance(value, str) else None

    def set_default(self, name: str) -> None:
        """Write ``[server] default = NAME`` (the credential ``GET /token`` serves)."""
        self.doc.setdefault("server", tomlkit.table())["default"] = name
        self.validate()

    def write(self) -> None:
        """Atomically replace the file, an old one with the mode and owners :func:`_kept` says.
        A new file is private (0600, in a 0700 directory made if missing), except the
        system's ``/etc/token-broker/config.toml``: the system service runs as a user of
        its own (``DynamicUser=``) that must read it, and the file holds no secret, so
        it is 0644 in a 0755 directory, as the install steps make it.
        """
        system = self.path == config.SYSTEM_CONFIG
        mode, uid, gid = 0o644 if system else 0o600, -1, -1
        try:
            if self.exists:
                mode, uid, gid = _kept(self.path.stat())
            if not self.path.parent.is_dir():
                self.path.parent.parent.mkdir(parents=True, exist_ok=True)
                self.path.parent.mkdir(mode=0o755 if system else 0o700)
                os.chmod(self.path.parent, 0o755 if system else 0o700)  # whatever the umask
            atomic_write(self.path, tomlkit.dumps(self.doc).encode(), mode, uid=uid, gid=gid)
        except OSError as exc:
            text = f"{self.path}: cannot write the config file ({exc.strerror or exc})"
            if system and os.geteuid() != 0:
                raise ConfigError(
                    f"{text}: it is the system's config; run the command as root to change it, "
                    f"or pass --config {config.user_config_path()} to keep a config of your own"
                ) from None
            raise ConfigError(f"{text}; pass --config PATH to write another file") from None
        self.exists = True


def _kept(st: os.stat_result) -> tuple[int, int, int]:
    """(mode, uid, gid) for the new file that replaces the one ``st`` describes: root
    keeps both owner and group (``sudo token-broker add`` must not hand a user's config
    to root); another user keeps the group if it is one of theirs, and owns the new file
    itself (-1: as created), since only root may give a file away."""
    if os.geteuid() == 0:
        return st.st_mode & 0o777, st.st_uid, st.st_gid
    mine = st.st_gid == os.getegid() or st.st_gid in os.getgroups()
    return st.st_mode & 0o777, -1, st.st_gid if mine else -1
