"""``env:VAR``: an environment variable of the daemon (the weakest store; for development)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from broker.errors import SecretError
from broker.stores.base import NO_CONTEXT, Context, SecretRef, Stored, register


@register
@dataclass(frozen=True)
class EnvRef(SecretRef):
    kind = "env"
    shapes = ("env:VAR",)
    variable: str = ""

    def describe(self) -> str:
        return f"environment variable {self.variable}"

    async def read(self, name: str, ctx: Context = NO_CONTEXT) -> tuple[str, ...]:
        if not (value := os.environ.get(self.variable)):
            raise SecretError(
                f"credential {name!r}: environment variable {self.variable} is not set"
            )
        return (value,)

    def unwritable(self) -> str | None:
        return (
            f"an environment variable ({self.variable}) cannot be changed for the next "
            'start by the daemon; use secret = "keyring" or a file: secret it may write'
        )

    async def store_new(
        self, name: str, values: list[str], *, force: bool = False, ctx: Context = NO_CONTEXT
    ) -> Stored:
        raise SecretError(
            f"credential {name!r}: --secret env:{self.variable} cannot be written: an "
            "environment variable belongs to whatever starts the daemon, not to token-broker; "
            "use keyring, file:PATH or systemd:NAME (or set the variable there yourself and "
            f'write secret = "env:{self.variable}" in the config)'
        )
