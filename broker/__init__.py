"""token-broker: OAuth client secrets in the keyring, access tokens on loopback."""

__version__ = "0.1.0"
