"""Secret stores: one class per kind of ``secret = …`` reference (docs/architecture.md)."""

from __future__ import annotations

from broker.stores.base import (
    NO_CONTEXT,
    Context,
    FileMode,
    SecretRef,
    SecretWriter,
    Stored,
    file_mode,
    parse,
    register,
)
from broker.stores.env import EnvRef
from broker.stores.file import FileRef, next_file
from broker.stores.keyring import KeyringRef
from broker.stores.systemd import SystemdRef
from broker.stores.vault import VaultRef, VaultSession

__all__ = [
    "NO_CONTEXT",
    "Context",
    "EnvRef",
    "FileMode",
    "FileRef",
    "KeyringRef",
    "SecretRef",
    "SecretWriter",
    "Stored",
    "SystemdRef",
    "VaultRef",
    "VaultSession",
    "file_mode",
    "next_file",
    "parse",
    "register",
]
