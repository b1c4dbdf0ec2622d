"""Token issuers: Adobe IMS Server-to-Server and generic OAuth 2.0 client credentials.

A provider turns (credential settings, secret) into one token request and
parses the answer defensively into a :class:`~broker.tokens.Token`, or raises
:class:`~broker.errors.IssuerError`. The HTTP client is handed in.
"""

from __future__ import annotations

from broker.config import CredentialSettings
from broker.providers.base import Fetch, fetch_token


def token_request(cred: CredentialSettings, secret: str) -> Fetch:
    """The request that asks ``cred``'s issuer for a token with ``secret``."""
    if cred.provider == "adobe":
        from broker.providers.adobe import request
    else:
        from broker.providers.oauth2 import request
    return request(cred, secret)


__all__ = ["Fetch", "fetch_token", "token_request"]
