"""Secret cycling: the broker replaces its own client secret through Adobe's I/O
Management API (docs/architecture.md, "A secret cycle").

:mod:`~broker.cycling.console` speaks the API, :mod:`~broker.cycling.state`
keeps a cycle's state and says where it lives, :mod:`~broker.cycling.cycle` is
one cycle's five steps, :mod:`~broker.cycling.cycler` the daemon's scheduling.
"""

from __future__ import annotations

from broker.cycling.cycle import Cycle, CycleResult
from broker.cycling.cycler import ROTATE_COOLDOWN, Cycler, CycleStatus, SecretHolder
from broker.cycling.state import CycleState, StateFile, StateStore, digest

__all__ = [
    "ROTATE_COOLDOWN",
    "Cycle",
    "CycleResult",
    "CycleState",
    "CycleStatus",
    "Cycler",
    "SecretHolder",
    "StateFile",
    "StateStore",
    "digest",
]
