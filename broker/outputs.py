"""File outputs (docs/using-tokens.md): the token written where tools that read files find it.

The file of an ``[[outputs]]`` table is written once its credential has a servable
token and again after every refresh, as consul-template writes: a temporary file in the
same directory, created with no more permission than asked (``mode & 0600``),
given its group and then exactly its mode before the first byte, written,
fsync'ed, renamed over the path. A reader sees the old file or the new one,
whole, and never a looser mode, not even for an instant.

A command (an argv, never a shell) runs after each write, with a minimal
environment (never the broker's: an ``env:`` secret lives there), in a
process group of its own, and 30 seconds to finish; then, and when the
daemon stops, the whole group is ended (SIGTERM, SIGKILL 2 s later), so a
child the command started (``sh -c 'sleep 300; :'``) is not left behind,
one more at every refresh. A failed write or command is logged once, counted in
``/metrics`` and tried again at the next refresh; serving never waits for it.
Writes of one output never overlap: a new token that arrives meanwhile is
written once the running write is done (only the newest).
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import signal
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from broker.config import OutputSettings
from broker.files import atomic_write
from broker.metrics import Recorder
from broker.schema import CredentialSettings
from broker.tokens import Clock, Token, rfc3339
from broker.variables import EnvFileError, TokenExport, env_file, variables

if TYPE_CHECKING:
    from broker.manager import Credential

log = logging.getLogger("broker.outputs")

#: How long a command may run after a write before its process group is ended.
COMMAND_TIMEOUT = 30.0
#: From SIGTERM to the command's process group to SIGKILL: time to clean up, not to finish.
COMMAND_GRACE = 2.0
#: What a command's environment holds: enough to find programs and read text, no more.
_COMMAND_ENV = ("PATH", "LANG", "LC_ALL", "TZ")


def render(output: OutputSettings, cred: CredentialSettings, token: Token, now: float) -> bytes:
    if output.format == "token":
        return token.access_token.encode() + b"\n"
    if output.format == "json":
        return json.dumps(token.as_json(now)).encode() + b"\n"
    headers = cred.api_headers(token.access_token)
    if output.format == "headers":
        return json.dumps(headers).encode() + b"\n"
    export = TokenExport(
        cred.name,
        token.access_token,
        rfc3339(token.expires_at) or "",
        token.expires_at - now,
        cred.client_id,
        headers,
    )
    return env_file(variables(export)).encode()


def write_file(path: Path, content: bytes, mode: int, group: str | None) -> None:
    """Replace ``path`` atomically with ``content``, mode and group set before any byte."""
    atomic_write(path, content, mode, gid=grp.getgrnam(group).gr_gid if group is not None else -1)


class Outputs:
    """The file outputs of the settings in force, written as tokens arrive."""

    def __init__(
        self,
        outputs: Iterable[OutputSettings] = (),
        *,
        recorder: Recorder,
        clock: Clock,
        writer: Callable[[Path, bytes, int, str | None], None] = write_file,
        command_timeout: float = COMMAND_TIMEOUT,
        command_grace: float = COMMAND_GRACE,
    ) -> None:
        self._outputs = tuple(outputs)
        self._recorder = recorder
        self._clock = clock
        self._writer = writer
        self._command_timeout = command_timeout
        self._command_grace = command_grace
        self._tasks: dict[str, asyncio.Task[None]] = {}  # by path: one write at a time
        self._next: dict[str, tuple[OutputSettings, CredentialSettings, Token]] = {}
        self._running: set[asyncio.subprocess.Process] = set()
        self._closing = False

    def use(self, outputs: Iterable[OutputSettings], credentials: dict[str, Credential]) -> None:
        """Take the outputs of a reloaded config: write the new or changed ones now, and
        remove the files of those that are gone (a token left lying there stays valid)."""
        old = set(self._outputs)
        self._outputs = tuple(outputs)
        kept = {o.path for o in self._outputs}
        for gone in (o for o in old - set(self._outputs) if o.path not in kept):
            self._next.pop(gone.path, None)
            try:
                os.unlink(gone.path)
            except OSError:
                continue
            log.info("output %s removed from the config: file deleted", gone.path)
        for output in self._outputs:
            if output not in old and (credential := credentials.get(output.credential)) is not None:
                self._write_if_servable(output, credential)

    def refreshed(self, credential: Credential) -> None:
        """A credential has a new token: write every output of it (in the background)."""
        for output in self._outputs:
            if output.credential == credential.settings.name:
                self._write_if_servable(output, credential)

    async def close(self) -> None:
        """Let writes in flight finish; end running commands, each with its process group,
        and start no more."""
        self._closing = True
        await asyncio.gather(*[self._end(proc) for proc in self._running], return_exceptions=True)
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    def _write_if_servable(self, output: OutputSettings, credential: Credential) -> None:
        if (token := credential.token) is None or self._clock() >= credential.serve_until:
            return
        self._next[output.path] = (output, credential.settings, token)
        if output.path not in self._tasks:
            self._tasks[output.path] = asyncio.create_task(self._drain(output.path))

    async def _drain(self, path: str) -> None:
        try:
            while (job := self._next.pop(path, None)) is not None:
                await self._write(*job)
        finally:
            del self._tasks[path]

    async def _write(self, output: OutputSettings, cred: CredentialSettings, token: Token) -> None:
        target = Path(output.path)
        try:
            content = render(output, cred, token, self._clock())
            await asyncio.to_thread(self._writer, target, content, output.mode, output.group)
        except (OSError, KeyError, EnvFileError) as exc:
            self._recorder.output(output.path, "write", "error")
            if isinstance(exc, EnvFileError):
                reason = str(exc)  # names the variable, never the value
            else:
                reason = getattr(exc, "strerror", None) or f"no group named {output.group!r}"
            log.warning(
                "output %s for %s not written: %s; tried again at the next refresh",
                output.path, cred.name, reason,
                extra={"event": "output_failed", "credential": cred.name},
            )  # fmt: skip
            return
        self._recorder.output(output.path, "write", "ok")
        log.info(
            "output %s written for %s (token=…%s)",
            output.path, cred.name, token.fingerprint,
            extra={"event": "output_written", "credential": cred.name},
        )  # fmt: skip
        if output.command is not None:
            await self._run(output.path, output.command, cred.name)

    async def _run(self, path: str, command: tuple[str, ...], name: str) -> None:
        if self._closing:
            return  # the daemon is stopping: the file is written, the command not started
        env = {k: os.environ[k] for k in _COMMAND_ENV if k in os.environ}
        env.update(TOKEN_BROKER_OUTPUT=path, TOKEN_BROKER_CREDENTIAL=name)
        failure = ""  # what went wrong, if anything
        try:
            proc = await asyncio.create_subprocess_exec(
                *command,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                # A session, so a process group, of its own: a signal to the broker's group
                # is not the command's, and the command's whole group can be ended at once.
                start_new_session=True,
            )
        except OSError as exc:
            failure = f"cannot run {command[0]}: {exc.strerror}"
        else:
            self._running.add(proc)
            try:
                if self._closing:  # close() began while this one was starting
                    await self._end(proc)
                async with asyncio.timeout(self._command_timeout):
                    _, err = await proc.communicate()
            except TimeoutError:
                await self._end(proc)
                failure = f"ended after {self._command_timeout:g}s, with its process group"
            else:
                if self._closing and proc.returncode is not None and proc.returncode < 0:
                    failure = "ended with its process group: the broker stopped"
                elif proc.returncode != 0:
                    tail = err.decode(errors="replace").strip().splitlines()[-1:] or [""]
                    failure = f"exit status {proc.returncode} {tail[0][:200]}".rstrip()
            finally:
                self._running.discard(proc)
        self._recorder.output(path, "command", "error" if failure else "ok")
        if failure:
            log.warning(
                "output %s: command %s failed: %s; run again at the next refresh",
                path, command[0], failure,
                extra={"event": "output_command_failed", "credential": name},
            )  # fmt: skip

    async def _end(self, proc: asyncio.subprocess.Process) -> None:
        """End a command and every process of its group: SIGTERM, then after the grace
        SIGKILL to whatever is left (a child that ignores SIGTERM, or a slow one)."""
        group = proc.pid  # start_new_session: the command leads its own group
        _signal_group(group, signal.SIGTERM)
        await self._until_gone(group)
        if _group_alive(group):
            # The group's id cannot go to another process while any member lives; between
            # this check and the signal, a new group with that id would need the pid
            # counter to wrap around.
            _signal_group(group, signal.SIGKILL)
            await self._until_gone(group)  # delivered at once; the exits take a moment
        try:
            # asyncio's wait() also waits for the stderr pipe to close; a process that left
            # the group (setsid) may hold it still: bounded, so this never hangs the daemon.
            async with asyncio.timeout(self._command_grace):
                await proc.wait()
        except TimeoutError:
            log.warning(
                "output command %s: a process it started outside its process group still "
                "holds its stderr; not waiting for it", proc.pid,
            )  # fmt: skip

    async def _until_gone(self, group: int) -> None:
        """Wait, at most the grace, for every process of ``group`` to be gone."""
        deadline = asyncio.get_running_loop().time() + self._command_grace
        # Polled: nothing tells a process when a group it does not lead has emptied.
        while _group_alive(group) and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


def _signal_group(group: int, sig: signal.Signals) -> None:
    # The group may be gone (or hold only a process that changed its user).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, sig)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, as another user
    return True
