"""Adobe IMS OAuth Server-to-Server: ``provider = "adobe"``.

``POST {ims_url}/ims/token/v3``, form-encoded, scopes joined by commas, the
secret in the body (never the URL). API calls carry ``x-api-key`` (the client
ID) and ``x-gw-ims-org-id``. The Developer Console ids (``credential_id``,
``console_org_id``) and ``rotate_every`` let the broker cycle the secret through
the I/O Management API (:mod:`broker.cycling`).
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator

from broker.net import is_loopback
from broker.providers.base import TokenRequest
from broker.schema import NAME_RE, CredentialSettings, Duration, KeyProblem

DEFAULT_IMS_URL = "https://ims-na1.adobelogin.com"
DEFAULT_CONSOLE_URL = "https://api.adobe.io"
#: The scopes of the token that may list, add and delete the credential's secrets (the
#: I/O Management API), and nothing else: it is minted for a cycle, never served.
MANAGEMENT_SCOPES = (
    "AdobeID", "openid", "read_organizations", "additional_info.projectedProductContext",
    "additional_info.roles", "adobeio_api", "read_client_secret", "manage_client_secrets",
)  # fmt: skip


class AdobeSettings(CredentialSettings):
    """``provider = "adobe"``: Adobe IMS OAuth Server-to-Server."""

    provider: Literal["adobe"]
    org_id: str | None = None
    ims_url: str = DEFAULT_IMS_URL
    # Secret cycling through the I/O Management API (docs/credentials.md).
    # workspace.details.credentials[].id; it goes into a URL path, so no '/', '?', '#'
    credential_id: str | None = None
    console_org_id: str | None = Field(None, min_length=1)  # project.org.id (numeric)
    console_url: str = DEFAULT_CONSOLE_URL
    rotate_every: Duration | None = Field(None, ge=1)  # None: no automatic cycling
    rotate_verify: Duration = Field(300.0, gt=0)  # how long a new secret is tried at IMS
    #: A fleet (a vault: secret): how long the cycling broker waits for brokers still on
    #: the old secret before it deletes it anyway; default 10 x [vault] poll.
    rotate_grace: Duration | None = Field(None, gt=0)

    def token_request(self, secret: str) -> TokenRequest:
        form = {"grant_type": "client_credentials", "client_id": self.client_id,
                "client_secret": secret}  # fmt: skip
        if self.scopes:
            form["scope"] = ",".join(self.scopes)
        return TokenRequest(url=f"{self.ims_url}/ims/token/v3", form=form, secret=secret)

    def api_headers(self, access_token: str) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {access_token}", "x-api-key": self.client_id}
        if self.org_id:
            headers["x-gw-ims-org-id"] = self.org_id
        return {**headers, **dict(self.headers)}

    @property
    def cycling(self) -> bool:
        """Whether the Console ids are known, so a cycle can run (now or on schedule)."""
        return self.credential_id is not None and self.console_org_id is not None

    @property
    def cycles_secret(self) -> bool:
        return self.rotate_every is not None

    def for_management(self) -> AdobeSettings:
        """These settings with the management scopes: the token of a secret cycle."""
        return self.model_copy(update={"scopes": MANAGEMENT_SCOPES})

    @field_validator("ims_url", "console_url")
    @classmethod
    def _no_trailing_slash(cls, value: str, info: ValidationInfo) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError(f"expected an https:// URL, got {value!r}")
        if info.field_name == "console_url" and value.startswith("http://"):
            host = urlsplit(value).hostname or ""
            if host != "localhost" and not is_loopback(host):
                # The management token (it can delete this credential's secrets) would
                # cross the network in clear.
                raise ValueError(f"expected an https:// URL (http only on loopback), got {value!r}")
        return value.rstrip("/")

    @field_validator("org_id")
    @classmethod
    def _ims_org(cls, value: str | None) -> str | None:
        if value is not None and (not value.endswith("@AdobeOrg") or value == "@AdobeOrg"):
            raise ValueError(
                f"expected the IMS organization id, which ends in @AdobeOrg "
                f"(e.g. 0123456789ABCDEF01234567@AdobeOrg; project.org.ims_org_id in the "
                f"Developer Console project JSON), got {value!r}"
            )
        return value

    @field_validator("credential_id")
    @classmethod
    def _url_safe(cls, value: str | None) -> str | None:
        if value is not None and not NAME_RE.match(value):
            raise ValueError(f"expected the credential's id from the project JSON, got {value!r}")
        return value

    @field_validator("console_org_id")
    @classmethod
    def _numeric_org(cls, value: str | None) -> str | None:
        if value is not None and not value.isdigit():
            raise ValueError(
                f"expected the numeric Developer Console org id (project.org.id in the "
                f"project JSON), not the IMS org {value!r} (that one is org_id)"
                if value.endswith("@AdobeOrg")
                else f"expected the numeric Developer Console org id, got {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _cycling(self) -> AdobeSettings:
        if self.rotate_every is None:
            return self
        if missing := [k for k in ("credential_id", "console_org_id") if getattr(self, k) is None]:
            raise KeyProblem(
                "rotate_every",
                f"secret cycling needs {' and '.join(missing)} (`token-broker import` records "
                "both from the Developer Console project JSON)",
            )
        if not self.secret.writable:
            raise KeyProblem("rotate_every", str(self.secret.unwritable()))
        return self
