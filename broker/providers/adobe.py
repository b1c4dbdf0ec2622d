"""Adobe IMS OAuth Server-to-Server (DESIGN §6).

``POST {ims_url}/ims/token/v3``, form-encoded, scopes joined by commas, the
secret in the body (never the URL).
"""

from __future__ import annotations

from broker.config import AdobeSettings
from broker.providers.base import TokenRequest


def request(cred: AdobeSettings, secret: str) -> TokenRequest:
    form = {
        "grant_type": "client_credentials",
        "client_id": cred.client_id,
        "client_secret": secret,
    }
    if cred.scopes:
        form["scope"] = ",".join(cred.scopes)
    return TokenRequest(url=f"{cred.ims_url}/ims/token/v3", form=form, secret=secret)


def api_headers(cred: AdobeSettings, access_token: str) -> dict[str, str]:
    """The headers an Adobe API call needs besides its own."""
    headers = {"Authorization": f"Bearer {access_token}", "x-api-key": cred.client_id}
    if cred.org_id:
        headers["x-gw-ims-org-id"] = cred.org_id
    return headers
