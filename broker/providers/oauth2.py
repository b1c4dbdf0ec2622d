"""Any OAuth 2.0 client-credentials issuer (RFC 6749 §4.4): ``provider = "oauth2"``."""

from __future__ import annotations

import base64
from typing import Literal
from urllib.parse import quote_plus

from pydantic import field_validator

from broker.providers.base import TokenRequest
from broker.schema import CredentialSettings


class OAuth2Settings(CredentialSettings):
    """``provider = "oauth2"``: the token endpoint, how the client authenticates, extra
    form fields."""

    provider: Literal["oauth2"]
    token_url: str
    auth_method: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"
    params: tuple[tuple[str, str], ...] = ()  # extra form fields, in the file's order

    def token_request(self, secret: str) -> TokenRequest:
        form = {"grant_type": "client_credentials"}
        if self.scopes:
            form["scope"] = " ".join(self.scopes)  # RFC 6749 §3.3: space-delimited
        form.update(self.params)
        headers: dict[str, str] = {}
        if self.auth_method == "client_secret_post":
            form.update(client_id=self.client_id, client_secret=secret)
        else:
            headers["Authorization"] = basic_auth(self.client_id, secret)
        return TokenRequest(url=self.token_url, form=form, headers=headers, secret=secret)

    @field_validator("params", mode="before")
    @classmethod
    def _pairs(cls, value: object) -> object:
        return tuple(value.items()) if isinstance(value, dict) else value


def basic_auth(client_id: str, secret: str) -> str:
    """RFC 6749 §2.3.1: form-encode id and secret *before* joining and base64."""
    pair = f"{quote_plus(client_id)}:{quote_plus(secret)}"
    return "Basic " + base64.b64encode(pair.encode()).decode("ascii")
