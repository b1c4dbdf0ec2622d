"""token-broker: OAuth client secrets in the keyring, access tokens on loopback."""

from __future__ import annotations


def __getattr__(name: str) -> str:
    # The version is written once, in pyproject.toml, and read back from the installed
    # metadata, on first use only: the Python client is imported by other people's tools.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("token-broker")
        except PackageNotFoundError:  # a source tree that is not installed
            return "0+unknown"
    raise AttributeError(f"module 'broker' has no attribute {name!r}")
