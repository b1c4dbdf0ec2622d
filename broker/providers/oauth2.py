"""Generic OAuth 2.0 client-credentials grant (RFC 6749 §4.4)."""

from __future__ import annotations

import base64
from urllib.parse import quote_plus

from broker.config import OAuth2Settings
from broker.providers.base import TokenRequest


def request(cred: OAuth2Settings, secret: str) -> TokenRequest:
    form = {"grant_type": "client_credentials"}
    if cred.scopes:
        form["scope"] = " ".join(cred.scopes)  # RFC 6749 §3.3: space-delimited
    form.update(cred.params)
    headers: dict[str, str] = {}
    if cred.auth_method == "client_secret_post":
        form["client_id"] = cred.client_id
        form["client_secret"] = secret
    else:
        headers["Authorization"] = basic_auth(cred.client_id, secret)
    return TokenRequest(url=str(cred.token_url), form=form, headers=headers, secret=secret)


def basic_auth(client_id: str, secret: str) -> str:
    """RFC 6749 §2.3.1: form-encode id and secret *before* joining and base64."""
    pair = f"{quote_plus(client_id)}:{quote_plus(secret)}"
    return "Basic " + base64.b64encode(pair.encode()).decode("ascii")
