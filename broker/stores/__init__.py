"""Secret stores: one class per kind of ``secret = …`` reference (docs/architecture.md)."""

from __future__ import annotations

from broker.stores.base import NO_CONTEXT as NO_CONTEXT
from broker.stores.base import Context as Context
from broker.stores.base import FileMode as FileMode
from broker.stores.base import SecretRef as SecretRef
from broker.stores.base import SecretWriter as SecretWriter
from broker.stores.base import Stored as Stored
from broker.stores.base import file_mode as file_mode
from broker.stores.base import parse as parse
from broker.stores.base import register as register
from broker.stores.env import EnvRef as EnvRef
from broker.stores.file import FileRef as FileRef
from broker.stores.file import next_file as next_file
from broker.stores.keyring import KeyringRef as KeyringRef
from broker.stores.systemd import SystemdRef as SystemdRef
from broker.stores.vault import VaultRef as VaultRef
from broker.stores.vault import VaultSession as VaultSession
