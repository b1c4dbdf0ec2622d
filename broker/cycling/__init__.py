"""Secret cycling: the broker replaces its own client secret through Adobe's I/O
Management API (docs/architecture.md, "A secret cycle").

:mod:`~broker.cycling.console` speaks the API, :mod:`~broker.cycling.state`
keeps a cycle's state and says where it lives, :mod:`~broker.cycling.cycle` is
one cycle's five steps, :mod:`~broker.cycling.cycler` the daemon's scheduling.
"""

from __future__ import annotations

from pathlib import Path

from broker.cycling.cycle import Cycle as Cycle
from broker.cycling.cycle import CycleResult as CycleResult
from broker.cycling.cycler import ROTATE_COOLDOWN as ROTATE_COOLDOWN
from broker.cycling.cycler import Cycler as Cycler
from broker.cycling.cycler import CycleStatus as CycleStatus
from broker.cycling.cycler import SecretHolder as SecretHolder
from broker.cycling.fleet import VaultState as VaultState
from broker.cycling.state import CycleState as CycleState
from broker.cycling.state import StateFile as StateFile
from broker.cycling.state import StateStore as StateStore
from broker.cycling.state import digest as digest
from broker.providers.adobe import AdobeSettings
from broker.stores import VaultRef, VaultSession


def state_store(
    name: str, cred: AdobeSettings, *, directory: Path, vault: VaultSession | None
) -> StateStore:
    """Where ``name``'s cycle state lives: beside its secret in Vault (a fleet shares it),
    else a file in this broker's state ``directory``."""
    if isinstance(cred.secret, VaultRef) and vault is not None:
        return VaultState(name, cred.secret, vault, grace=cred.rotate_grace)
    return StateFile(directory, name)
