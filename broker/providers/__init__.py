"""Token issuers, one module per kind: Adobe IMS Server-to-Server and generic OAuth 2.0.

A provider is its settings class (a :class:`~broker.schema.CredentialSettings`):
the keys of its ``[credentials.NAME]`` table, its token request and the headers
an API call needs. :data:`PROVIDERS` maps ``provider = "…"`` to that class; the
config picks it once, when it is loaded. Adding a provider is one module and one
line here (docs/architecture.md, "Providers").
"""

from __future__ import annotations

import httpx

from broker.providers.adobe import AdobeSettings
from broker.providers.base import IssuedToken, TokenRequest, request_token
from broker.providers.oauth2 import OAuth2Settings
from broker.schema import CredentialSettings
from broker.upstream import client as upstream_client

PROVIDERS: dict[str, type[CredentialSettings]] = {
    "adobe": AdobeSettings,
    "oauth2": OAuth2Settings,
}


class IssuerClients:
    """The daemon's HTTP clients for issuers: one shared, and one per private CA
    (``ca_file``) that alone is trusted for the credentials that name it."""

    def __init__(self, shared: httpx.AsyncClient) -> None:
        self._shared = shared
        self._by_ca: dict[str, httpx.AsyncClient] = {}

    def for_(self, cred: CredentialSettings) -> httpx.AsyncClient:
        if cred.ca_file is None:
            return self._shared
        if cred.ca_file not in self._by_ca:
            self._by_ca[cred.ca_file] = upstream_client(cred.policy.timeout, cred.ca_file)
        return self._by_ca[cred.ca_file]

    async def aclose(self) -> None:
        await self._shared.aclose()
        for client in self._by_ca.values():
            await client.aclose()


__all__ = [
    "PROVIDERS",
    "AdobeSettings",
    "IssuedToken",
    "IssuerClients",
    "OAuth2Settings",
    "TokenRequest",
    "request_token",
]
