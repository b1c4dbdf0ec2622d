"""What every kind of secret reference is, and the registry that picks one from its text.

A reference (``secret = "file:/run/secrets/adobe"``) is parsed once, when the
config is loaded, into an instance of its kind's class; after that nothing
compares kind strings. Adding a kind is one module and one :func:`register`
(docs/architecture.md, "Secret stores").
"""

from __future__ import annotations

import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from broker.errors import SecretError

if TYPE_CHECKING:
    from broker.stores.vault import VaultSession

_KINDS: dict[str, type[SecretRef]] = {}


def register(kind: type[SecretRef]) -> type[SecretRef]:
    """Make ``kind`` parse the references that start with ``kind.kind + ":"``."""
    _KINDS[kind.kind] = kind
    return kind


def parse(text: str, credential: str) -> SecretRef:
    """The reference ``text`` of ``credential``; ValueError with a sentence if malformed."""
    kind, sep, rest = text.partition(":")
    found = _KINDS.get(kind)
    # A newline or other control character: a typo, never a name (and it would split
    # the log lines and messages that quote the reference).
    if found is not None and (sep or found.bare) and text.isprintable():
        ref = found.from_text(text, rest if sep else None, credential)
        if ref is not None:
            return ref
    kinds = sorted(_KINDS.values(), key=lambda k: (not k.bare, k.kind))  # the default first
    shapes = [f'"{shape}"' for k in kinds for shape in k.shapes]
    listed = ", ".join(shapes[:-1]) + f" or {shapes[-1]}"
    raise ValueError(f"expected {listed}, got {text!r}")


@dataclass(frozen=True)
class Context:
    """What reading or writing a store may need beyond the reference itself: the
    daemon's (or a command's) Vault session when ``[vault]`` is configured."""

    vault: VaultSession | None = None


NO_CONTEXT = Context()


@dataclass(frozen=True)
class SecretRef(ABC):
    """A ``secret = …`` reference, parsed once when the config is loaded."""

    #: The word before the colon; ``shapes``: how references of this kind are written.
    kind: ClassVar[str]
    shapes: ClassVar[tuple[str, ...]]
    #: Whether the bare word (``keyring``, without a colon) is a reference of this kind.
    bare: ClassVar[bool] = False
    #: Whether a new secret can ever be written here (whether this process may, now, is
    #: :meth:`unwritable`'s answer): a cycled credential needs such a store. Its
    #: ``writer_class`` does the writing.
    writable: ClassVar[bool] = False
    writer_class: ClassVar[type[SecretWriter]]
    #: Whether reading it needs the ``[vault]`` table's client (:class:`Context`).
    needs_vault: ClassVar[bool] = False
    #: Whether the broker owns what it stores there (``remove`` deletes it): only the
    #: keyring; a file, a systemd credential, a Vault secret may be shared or managed
    #: elsewhere.
    owned: ClassVar[bool] = False

    text: str  # as written in the config

    @classmethod
    def from_text(cls, text: str, rest: str | None, credential: str) -> SecretRef | None:
        """The reference whose part after the colon is ``rest`` (by default, not blank,
        the kind's one field: ``env:VAR``); None if malformed."""
        return cls(text, rest) if rest and rest.strip() else None  # type: ignore[call-arg]

    def __str__(self) -> str:
        return self.text

    @abstractmethod
    def describe(self) -> str:
        """Where the reference points, in words (for errors, ``list`` and ``doctor``)."""

    @abstractmethod
    async def read(self, name: str, ctx: Context = NO_CONTEXT) -> tuple[str, ...]:
        """The secrets of credential ``name``, preferred first (two while a new one waits
        beside the old); SecretError with a sentence saying what failed and what to do."""

    def unwritable(self) -> str | None:
        """Why a new secret cannot be written here (cycling, ``rotate``); None if it can."""
        return None if self.writable else f"token-broker cannot write a secret to {self.describe()}"

    def writer(self, name: str, ctx: Context = NO_CONTEXT) -> SecretWriter:
        """Where a cycle or a rotation writes ``name``'s new secret; SecretError if nowhere."""
        if (problem := self.unwritable()) is not None:
            raise SecretError(f"credential {name!r}: secret cycling cannot use {self}: {problem}")
        return self.writer_class(self, name, ctx)

    @abstractmethod
    async def store_new(
        self, name: str, values: list[str], *, force: bool = False, ctx: Context = NO_CONTEXT
    ) -> Stored:
        """Write a new credential's secret(s) here (``add``, ``import``): one, or two when a
        Console project lists two (the second where a rotation keeps the new one)."""

    def file(self) -> Path | None:
        """The file this reference reads, if any (its mode is checked at start and reload)."""
        return None

    def check_removal(self, name: str) -> None:
        """SecretError if :meth:`remove` could not do its part (checked before the config
        changes)."""
        return None

    async def remove(self, name: str) -> list[str]:
        """Delete what ``add`` stored for ``name`` (``remove``), in a store the broker owns;
        what was deleted, in words."""
        return []


@dataclass
class Stored:
    """Where ``add``/``import`` put a credential's secret(s), and how to take them back."""

    where: str  # in words, for the command's output
    count: int  # secrets written (0: the user writes them, see ``todo``)
    todo: list[str] = field(default_factory=list)  # commands the user still has to run
    undo: Callable[[], Coroutine[Any, Any, None]] = field(default=lambda: _nothing(), repr=False)


async def _nothing() -> None:
    return None


class SecretWriter(ABC):
    """A store that can hold a new secret beside the current one (secret cycling, ``rotate``).

    The current secret and, during a cycle or a rotation, the upcoming one, each in
    a place of its own (an item, a file, a field) that a kind reads (:meth:`_get`) and
    writes (:meth:`_put`); a store that can keep the old one as the previous until
    :meth:`finish` does so. Every method is idempotent, so a cycle resumed after a
    crash may repeat any of them.
    """

    def __init__(self, ref: SecretRef, name: str, ctx: Context = NO_CONTEXT) -> None:
        self.ref = ref
        self.name = name

    @abstractmethod
    async def _get(self, upcoming: bool) -> str | None:
        """The secret in the upcoming place, or the current one; None if none is there."""

    @abstractmethod
    async def _put(self, secret: str, upcoming: bool) -> None: ...

    @abstractmethod
    async def drop_upcoming(self) -> None: ...

    async def current(self) -> str | None:
        return await self._get(upcoming=False)

    async def upcoming(self) -> str | None:
        return await self._get(upcoming=True)

    async def put_upcoming(self, secret: str) -> None:
        await self._put(secret, upcoming=True)

    async def promote(self) -> None:
        """Make the upcoming secret the current one; nothing if there is none (done before)."""
        if (upcoming := await self.upcoming()) is not None:
            # Both places hold the new secret between these two steps: never a moment without.
            await self._put(upcoming, upcoming=False)
            await self.drop_upcoming()

    async def finish(self) -> None:
        """Forget the previous secret (the old one is deleted at the issuer now)."""
        return None


# -- shared by the kinds that read files ---------------------------------------------------


def read_file(path: Path, name: str, what: str) -> str:
    """A secret file's content, one trailing newline (and CR) stripped; SecretError if none."""
    try:
        data = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SecretError(f"credential {name!r}: {what} does not exist") from None
    except PermissionError:
        raise SecretError(
            f"credential {name!r}: {what} is not readable by this user (uid {os.getuid()})"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not UTF-8 text"
        raise SecretError(f"credential {name!r}: cannot read {what}: {reason}") from None
    secret = data.removesuffix("\n").removesuffix("\r")
    if not secret:
        raise SecretError(f"credential {name!r}: {what} is empty")
    return secret


@dataclass(frozen=True)
class FileMode:
    """The permission bits of a file the daemon trusts, and what is wrong with them."""

    path: Path
    what: str
    mode: int
    problem: str | None  # a sentence naming the file and the fix, or None when fine


def file_mode(path: Path, what: str, *, secret: bool) -> FileMode | None:
    """Check one file: a secret file must not be readable by group or others; a config
    file (no secret in it) may be readable, but whoever can write it can point
    ``token_url`` at their own server and receive the secret. None: no such file."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None  # a missing file is reported where it is read, with its own message
    problem = None
    if secret and mode & 0o077:
        problem = (
            f"{what} {path} has mode {mode:04o}: group or others can read the secret; "
            f"run `chmod 600 {path}` (Kubernetes: defaultMode: 0400)"
        )
    elif not secret and mode & 0o022:
        problem = (
            f"{what} {path} has mode {mode:04o}: group or others can change where the "
            f"secret is sent; run `chmod go-w {path}`"
        )
    return FileMode(path, what, mode, problem)
