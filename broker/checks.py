"""One check of ``token-broker doctor``: its verdict and its sentence.

A leaf module, so that every part with something to check (the config, the
secrets, the issuers, the local CA) returns the same type without importing
doctor, and doctor prints them all alike.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    """One line of doctor's checklist: ``ok`` is True, False, or None for a warning."""

    ok: bool | None
    text: str

    @property
    def verdict(self) -> str:
        """The word doctor prints before the sentence."""
        return {True: "ok", False: "FAIL", None: "warn"}[self.ok]
