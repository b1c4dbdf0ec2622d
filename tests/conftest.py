from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import IssuerThread  # noqa: E402


@pytest.fixture
def issuer() -> Iterator[IssuerThread]:
    """A real OAuth issuer on a loopback port that tests can switch into failure modes."""
    thread = IssuerThread().start()
    yield thread
    thread.stop()
