"""Edit the config file in place, keeping comments and everything else intact.

Used only by the CLI commands that change credentials (``add``, ``import``,
``remove``). Every change is validated as a whole config before anything is
written, and the write is atomic (temp file + rename), so a failure leaves
the old file exactly as it was.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.exceptions import TOMLKitError

from broker import config
from broker.errors import ConfigError


class ConfigDocument:
    """A config file as a tomlkit document, with its path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.exists = path.exists()
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
        if not config.NAME_RE.match(name):
            raise ConfigError(
                f"invalid credential name {name!r}: use only letters, digits, '.', '_' and '-'"
            )
        if name in self.credentials():
            raise ConfigError(f"{self.path}: a credential named {name!r} exists already")
        if "credentials" not in self.doc:
            self.doc["credentials"] = tomlkit.table(is_super_table=True)
        entry = tomlkit.table()
        for key, value in table.items():
            if value is not None:
                entry[key] = value
        self.doc["credentials"][name] = entry  # type: ignore[index]
        self.validate()

    def remove_credential(self, name: str) -> bool:
        """Remove ``[credentials.NAME]``; return True if it was the ``[server] default``."""
        if name not in self.credentials():
            raise ConfigError(f"{self.path}: no credential named {name!r}")
        del self.doc["credentials"][name]  # type: ignore[union-attr]
        server = self.doc.get("server")
        was_default = server is not None and server.get("default") == name
        if was_default:
            del server["default"]
        self.validate()
        return was_default

    def clients(self) -> dict[str, Any]:
        return dict(self.doc.get("clients", {}))

    def set_client(self, name: str, key_sha256: str, credentials: list[str]) -> bool:
        """Add ``[clients.NAME]`` or replace its key; return True if it existed."""
        if not config.NAME_RE.match(name):
            raise ConfigError(
                f"invalid client name {name!r}: use only letters, digits, '.', '_' and '-'"
            )
        if "clients" not in self.doc:
            self.doc["clients"] = tomlkit.table(is_super_table=True)
        existed = name in self.clients()
        entry = tomlkit.table()
        entry["key_sha256"] = key_sha256
        entry["credentials"] = credentials
        self.doc["clients"][name] = entry  # type: ignore[index]
        self.validate()
        return existed

    def remove_client(self, name: str) -> None:
        if name not in self.clients():
            raise ConfigError(f"{self.path}: no client named {name!r}")
        del self.doc["clients"][name]  # type: ignore[union-attr]
        if not self.doc["clients"]:  # type: ignore[arg-type]
            del self.doc["clients"]
        self.validate()

    def write(self) -> None:
        """Atomically replace the file; a new file gets mode 0600, an old one keeps its mode."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mode = self.path.stat().st_mode & 0o777 if self.exists else 0o600
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".config-", suffix=".toml")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(tomlkit.dumps(self.doc))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.exists = True
