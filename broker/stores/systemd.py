"""``systemd:NAME``: a systemd credential, ``$CREDENTIALS_DIRECTORY/NAME``
(``LoadCredential=`` / ``LoadCredentialEncrypted=`` in the unit)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from broker.errors import SecretError
from broker.stores.base import NO_CONTEXT, Context, SecretRef, Stored, read_file, register


@register
@dataclass(frozen=True)
class SystemdRef(SecretRef):
    kind = "systemd"
    shapes = ("systemd:NAME",)
    name: str = ""

    def describe(self) -> str:
        return f"systemd credential {self.name!r}"

    async def read(self, name: str, ctx: Context = NO_CONTEXT) -> tuple[str, ...]:
        if (path := self.file()) is None:
            raise SecretError(
                f"credential {name!r}: secret {self} needs $CREDENTIALS_DIRECTORY; "
                "run under systemd with LoadCredential= or LoadCredentialEncrypted="
            )
        return (read_file(path, name, self.describe()),)

    def file(self) -> Path | None:
        """The credential's file; None outside systemd ($CREDENTIALS_DIRECTORY unset)."""
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        return Path(directory) / self.name if directory else None

    def unwritable(self) -> str | None:
        return (
            "a systemd credential is a read-only copy made at the service's start, so "
            'the daemon cannot store a new secret there; use secret = "keyring" or a '
            "file: secret in a directory the service may write (e.g. its StateDirectory)"
        )

    async def store_new(
        self, name: str, values: list[str], *, force: bool = False, ctx: Context = NO_CONTEXT
    ) -> Stored:
        """Nothing is written here: ``systemd-creds`` encrypts it for the service."""
        target = f"/etc/credstore.encrypted/token-broker.{self.name}"
        todo = [
            f"systemd-creds encrypt --name={self.name} - {target}",
            f"LoadCredentialEncrypted={self.name}:{target}",
        ]
        return Stored(f"systemd credential {self.name!r} (not written yet: see below)", 0, todo)
