"""Token issuers: Adobe IMS Server-to-Server and generic OAuth 2.0 client credentials.

A provider turns (credential settings, secret) into one token request and
parses the answer defensively into a :class:`~broker.tokens.Token`, or raises
:class:`~broker.errors.IssuerError`. The HTTP client is handed in.
"""

from __future__ import annotations

import ssl

import httpx

from broker.config import CredentialSettings
from broker.providers.base import TokenRequest, fetch_token


def token_request(cred: CredentialSettings, secret: str) -> TokenRequest:
    """The request that asks ``cred``'s issuer for a token with ``secret``."""
    if cred.provider == "adobe":
        from broker.providers import adobe

        return adobe.request(cred, secret)
    from broker.providers import oauth2

    return oauth2.request(cred, secret)


def api_headers(cred: CredentialSettings, access_token: str) -> dict[str, str]:
    """Every header an API call with this token needs (``/v1/credentials/NAME/headers``).

    The token; for Adobe, ``x-api-key`` and ``x-gw-ims-org-id``; then the
    credential's static ``headers`` table. One place for the API route, the
    ``headers`` and ``env`` file outputs and, through the route, the client.
    """
    if cred.provider == "adobe":
        from broker.providers.adobe import api_headers as adobe_headers

        headers = adobe_headers(cred, access_token)
    else:
        headers = {"Authorization": f"Bearer {access_token}"}
    headers.update(cred.headers)
    return headers


def issuer_client(timeout: float, ca_file: str | None = None) -> httpx.AsyncClient:
    """The HTTP client token requests go through.

    Redirects are never followed (a token request is not re-sent elsewhere). The
    issuer's certificate is checked against the usual trust store (certifi's, or
    ``$SSL_CERT_FILE`` / ``$SSL_CERT_DIR``), or only against ``ca_file`` when a
    credential names one: a private CA is trusted for that issuer and nothing else.
    """
    verify: ssl.SSLContext | bool = True
    if ca_file is not None:
        verify = ssl.create_default_context(cafile=ca_file)
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout), follow_redirects=False, verify=verify)


__all__ = ["TokenRequest", "api_headers", "fetch_token", "issuer_client", "token_request"]
