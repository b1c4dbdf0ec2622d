"""The Adobe Developer Console's project JSON (the download of a project's overview):
its OAuth Server-to-Server credentials, and names for them.

``token-broker import`` reads it; secret cycling needs the Console ids it records.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.errors import ConfigError


@dataclass
class ConsoleCredential:
    name: str
    client_id: str
    client_secrets: list[str] = field(repr=False)
    scopes: list[str]
    org_id: str | None
    credential_id: str | None = None  # for secret cycling (rotate --auto)
    console_org_id: str | None = None
    management_api: bool = False  # the project lists the I/O Management API
    project: str | None = None  # the project's name (project.name, else project.title)


#: The I/O Management API's service code in a project JSON: secret cycling needs it.
MANAGEMENT_SERVICE = "AdobeIOManagementAPISDK"


def read_console_json(path: Path) -> tuple[list[ConsoleCredential], list[str]]:
    """The OAuth Server-to-Server credentials of a Developer Console project/workspace
    JSON, and a sentence for each credential of another type, refused."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except ValueError:  # UnicodeDecodeError included
        raise ConfigError(f"{path}: not JSON (expected the Developer Console export)") from None
    try:
        project = data["project"]
        creds = project["workspace"]["details"]["credentials"]
        org_id = project.get("org", {}).get("ims_org_id")
        console_org_id = _id_text(project.get("org", {}).get("id"))
        if not isinstance(creds, list):
            raise TypeError
    except (KeyError, TypeError):
        raise ConfigError(
            f"{path}: not an Adobe Developer Console project JSON "
            "(no project.workspace.details.credentials list)"
        ) from None
    project_name = next(
        (v for v in (project.get("name"), project.get("title")) if isinstance(v, str) and v),
        None,
    )
    services = project["workspace"]["details"].get("services")
    management = isinstance(services, list) and any(
        isinstance(x, dict) and x.get("code") == MANAGEMENT_SERVICE for x in services
    )
    found: list[ConsoleCredential] = []
    refused: list[str] = []
    for item in creds:
        if not isinstance(item, dict):
            raise ConfigError(f"{path}: a credential entry is not an object")
        label = str(item.get("name") or item.get("id") or "unnamed")
        kind = item.get("integration_type")
        if kind != "oauth_server_to_server":
            why = " (Service Account/JWT credentials are retired by Adobe: convert it to "
            why += "OAuth Server-to-Server in the Developer Console)" if kind == "service" else ""
            refused.append(f"{label!r}: integration_type {kind!r} is not supported{why}")
            continue
        s2s: Any = item.get("oauth_server_to_server")  # checked below, as it is used
        try:
            client_id = s2s["client_id"]
            client_secrets = s2s["client_secrets"]
            scopes = s2s.get("scopes", [])
            ok = isinstance(client_id, str) and client_id and isinstance(client_secrets, list)
            ok = ok and all(isinstance(x, str) and x for x in client_secrets) and client_secrets
            ok = ok and isinstance(scopes, list) and all(isinstance(x, str) for x in scopes)
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise ConfigError(
                f"{path}: credential {label!r}: oauth_server_to_server needs client_id, "
                "a non-empty client_secrets list and a scopes list"
            )
        found.append(ConsoleCredential(label, client_id, client_secrets, scopes, org_id,
                                       _id_text(item.get("id"), digits=False), console_org_id,
                                       management, project_name))  # fmt: skip
    return found, refused


def _id_text(value: object, *, digits: bool = True) -> str | None:
    """A Developer Console id as the config keeps it: a string (JSON may say 123)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value or "/" in value or not value.isprintable():
        return None
    return value if value.isdigit() or not digits else None


def console_name(label: str) -> str:
    """A credential name from a Console label: 'My Project (S2S)' -> 'my-project-s2s'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-.").lower() or "adobe"


def default_names(found: list[ConsoleCredential]) -> list[str]:
    """Names for imported credentials: the project's name, which tells projects apart.

    Adobe labels a project's OAuth Server-to-Server credential "Credential in
    Production" or "OAuth Server-to-Server" in every project, so names made from
    labels collide as soon as a second project is imported. With several such
    credentials in one project the first gets the project's name and the next ones
    ``-2``, ``-3``...; without a project name the credential's label is used.
    """
    return [
        f"{console_name(cred.project)}-{i + 1}"
        if i and cred.project
        else console_name(cred.project or cred.name)
        for i, cred in enumerate(found)
    ]
