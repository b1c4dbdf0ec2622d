"""Python code run as another local user, wherever the suite's own interpreter lives.

A test that checks what another user may do (a file it may not write) runs a
few lines of ``broker`` as that user. The interpreter running the suite may
be one that user cannot start: pyenv, conda or a virtualenv under a home
directory others cannot enter (``/root`` is 0700), and the checkout itself
may sit there too. So the code runs on an interpreter that user can start
(the suite's own, else the system's ``python3``), tried as that user, and
imports a copy of the ``broker`` package placed where that user can read it;
the copy needs nothing beyond the standard library for the modules these
tests import (``broker.stores``, ``broker.errors``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import broker

#: Interpreters tried, in order; the first the user can start and that is new enough wins.
CANDIDATES = (sys.executable, os.path.realpath(sys.executable), "/usr/bin/python3",
              "/usr/local/bin/python3")  # fmt: skip
_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


def _as(uid: int, gid: int) -> dict[str, object]:
    """subprocess arguments that run a program as ``uid`` (exec included, unlike setpriv,
    which still holds root's capabilities when it looks the program up)."""
    if os.geteuid() == uid:
        return {}
    return {"user": uid, "group": gid, "extra_groups": []}


def interpreter_for(uid: int, gid: int) -> str | None:
    """An interpreter (3.11 or newer) that ``uid`` can start, or None."""
    for candidate in dict.fromkeys(CANDIDATES):
        if not os.path.isabs(candidate):
            continue
        try:
            done = subprocess.run(
                [candidate, "-I", "-c", "import sys; print(sys.version_info >= (3, 11))"],
                capture_output=True, text=True, timeout=30, env=_ENV, cwd="/", **_as(uid, gid),
            )  # fmt: skip
        except OSError:  # EACCES on a path that user cannot traverse, ENOENT
            continue
        if done.returncode == 0 and done.stdout.strip() == "True":
            return candidate
    return None


@contextmanager
def readable_broker() -> Iterator[Path]:
    """A directory, readable by everyone, holding a copy of the ``broker`` package."""
    top = Path(tempfile.mkdtemp(prefix="tb-other-user-", dir="/tmp"))
    try:
        shutil.copytree(
            Path(broker.__file__).parent, top / "broker",
            ignore=shutil.ignore_patterns("__pycache__"),
        )  # fmt: skip
        for directory, _, files in os.walk(top):
            os.chmod(directory, 0o755)
            for name in files:
                os.chmod(os.path.join(directory, name), 0o644)
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def no_interpreter(uid: int) -> str:
    """Why a test must skip (or, in CI, fail): no interpreter ``uid`` can start."""
    tried = ", ".join(dict.fromkeys(CANDIDATES))
    return (
        f"no Python 3.11+ that uid {uid} can start (tried {tried}); the suite's interpreter "
        "lives where that user cannot enter: install the system's python3"
    )


def run_python_as(uid: int, gid: int, code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` as ``uid``:``gid`` (no supplementary groups), importing a readable copy
    of ``broker``; raise LookupError naming why when that user can start no interpreter."""
    python = sys.executable if os.geteuid() == uid else interpreter_for(uid, gid)
    if python is None:
        raise LookupError(no_interpreter(uid))
    with readable_broker() as path:
        # -I: neither the caller's PYTHON* variables nor its working directory reach the
        # child; the copy goes first on sys.path by hand.
        argv = [python, "-I", "-c", f"import sys; sys.path.insert(0, {str(path)!r}); {code}"]
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=60, env=_ENV, cwd="/",
            **_as(uid, gid),
        )  # fmt: skip
