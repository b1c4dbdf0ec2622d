"""What the broker relies on from Vault / OpenBao, pinned against a real OpenBao server.

Each test states one fact of the HTTP API (KV version 2, logins, tokens, policies,
namespaces, a sealed or stopped server) as the broker's Vault client will meet
it. If an OpenBao release behaves otherwise, a test here fails and names the
fact, before any broker test fails in a way that is hard to read.
"""

from __future__ import annotations

import email.utils
import re
import signal
import socket
import threading
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import wait_for
from openbao import BAO_VERSION, DevServer, JwtSigner, RaftServer

CAS_MISMATCH = "check-and-set parameter did not match the current version"
CAS_REQUIRED = "check-and-set parameter required for this call"
#: A valid token whose policies do not allow the path...
POLICY_DENIED = ["1 error occurred:\n\t* permission denied\n\n"]
#: ...and a token that is unknown, revoked or expired: both 403, told apart only by text.
TOKEN_DENIED = ["permission denied"]

SECRET = "tb/adobe"  # the credential's secret: vault:secret/tb/adobe#client_secret

#: Every broker of a credential: read the secret (data, and metadata to poll
#: current_version), write its own report under brokers/.
READER_POLICY = """
path "secret/data/tb/adobe" { capabilities = ["read"] }
path "secret/metadata/tb/adobe" { capabilities = ["read"] }
path "secret/data/tb/adobe/brokers/*" { capabilities = ["create", "update"] }
"""

#: A broker that cycles: the reader's rights, and write the secret, read and write
#: the lease (cycle), read and list the reports, delete stale ones.
CYCLER_POLICY = """
path "secret/data/tb/adobe" { capabilities = ["read", "create", "update"] }
path "secret/metadata/tb/adobe" { capabilities = ["read"] }
path "secret/data/tb/adobe/cycle" { capabilities = ["read", "create", "update"] }
path "secret/data/tb/adobe/brokers/*" { capabilities = ["read", "create", "update"] }
path "secret/metadata/tb/adobe/brokers/" { capabilities = ["list"] }
path "secret/metadata/tb/adobe/brokers/*" { capabilities = ["delete"] }
"""


def write(
    bao: DevServer, path: str, data: dict[str, Any], cas: object = None, token: str | None = None
) -> httpx.Response:
    """``POST secret/data/{path}``, with ``options.cas`` if given; the raw answer."""
    payload: dict[str, Any] = {"data": data}
    if cas is not None:
        payload["options"] = {"cas": cas}
    return bao.request("POST", f"secret/data/{path}", json=payload, token=token)


def test_the_server_is_the_pinned_version(openbao: DevServer) -> None:
    health = openbao.request("GET", "sys/health", token="")
    assert health.status_code == 200
    assert health.json()["version"] == BAO_VERSION
    assert health.json()["sealed"] is False


# -- KV version 2: read -----------------------------------------------------------------


def test_reading_a_secret_that_does_not_exist_is_404_with_no_errors(openbao: DevServer) -> None:
    for path in (f"secret/data/{SECRET}", f"secret/metadata/{SECRET}"):
        answer = openbao.request("GET", path)
        assert (answer.status_code, answer.json()) == (404, {"errors": []})


def test_read_gives_the_fields_and_the_version(openbao: DevServer) -> None:
    write(openbao, SECRET, {"client_secret": "one"})
    write(openbao, SECRET, {"client_secret": "two", "client_secret_pending": "three"})

    answer = openbao.request("GET", f"secret/data/{SECRET}")
    assert answer.status_code == 200
    data = answer.json()["data"]
    assert data["data"] == {"client_secret": "two", "client_secret_pending": "three"}
    assert data["metadata"]["version"] == 2  # an int
    assert set(data["metadata"]) == {
        "created_time",
        "custom_metadata",
        "deletion_time",
        "destroyed",
        "version",
    }
    assert data["metadata"]["deletion_time"] == "" and data["metadata"]["destroyed"] is False
    older = openbao.request("GET", f"secret/data/{SECRET}", params={"version": "1"})
    assert older.json()["data"]["data"] == {"client_secret": "one"}


def test_the_fields_come_back_with_their_json_types(openbao: DevServer) -> None:
    fields = {"s": "x", "n": 3, "f": 1.5, "b": True, "none": None, "list": [1], "obj": {"a": 1}}
    write(openbao, SECRET, fields)
    assert openbao.kv_read("secret", SECRET) == (fields, 1)


# -- KV version 2: check-and-set --------------------------------------------------------


def test_cas_0_writes_only_if_absent(openbao: DevServer) -> None:
    first = write(openbao, SECRET, {"client_secret": "a"}, cas=0)
    assert first.status_code == 200
    assert first.json()["data"]["version"] == 1

    again = write(openbao, SECRET, {"client_secret": "b"}, cas=0)
    assert (again.status_code, again.json()) == (400, {"errors": [CAS_MISMATCH]})
    assert openbao.kv_read("secret", SECRET) == ({"client_secret": "a"}, 1)


def test_cas_n_writes_only_at_version_n(openbao: DevServer) -> None:
    absent = write(openbao, SECRET, {"client_secret": "a"}, cas=1)
    assert (absent.status_code, absent.json()) == (400, {"errors": [CAS_MISMATCH]})

    write(openbao, SECRET, {"client_secret": "a"}, cas=0)
    for stale in (0, 2, 7):
        refused = write(openbao, SECRET, {"client_secret": "b"}, cas=stale)
        assert (refused.status_code, refused.json()) == (400, {"errors": [CAS_MISMATCH]})
    done = write(openbao, SECRET, {"client_secret": "b"}, cas=1)
    assert done.status_code == 200
    data = done.json()["data"]
    assert data["version"] == 2
    assert set(data) == {"created_time", "custom_metadata", "deletion_time", "destroyed", "version"}


def test_a_write_without_cas_always_succeeds_unless_cas_is_required(openbao: DevServer) -> None:
    write(openbao, SECRET, {"client_secret": "a"})
    assert write(openbao, SECRET, {"client_secret": "b"}).json()["data"]["version"] == 2


def test_a_cas_that_is_not_a_number_is_its_own_400(openbao: DevServer) -> None:
    answer = write(openbao, SECRET, {"client_secret": "a"}, cas="one")
    assert (answer.status_code, answer.json()) == (
        400,
        {"errors": ["error parsing check-and-set parameter"]},
    )


def test_of_concurrent_cas_writes_at_one_version_exactly_one_wins(openbao: DevServer) -> None:
    """The fleet's one coordination primitive: N brokers race for the lease, one gets it."""
    write(openbao, f"{SECRET}/cycle", {"holder": "nobody"}, cas=0)
    go = threading.Barrier(8)
    statuses: list[int] = []

    def contend(n: int) -> None:
        with httpx.Client(base_url=openbao.url, trust_env=False) as client:
            go.wait()
            answer = client.post(
                f"/v1/secret/data/{SECRET}/cycle",
                headers={"X-Vault-Token": openbao.root_token},
                json={"options": {"cas": 1}, "data": {"holder": f"broker-{n}"}},
            )
            statuses.append(answer.status_code)

    threads = [threading.Thread(target=contend, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200] + [400] * 7
    assert openbao.kv_read("secret", f"{SECRET}/cycle")[1] == 2  # type: ignore[index]


def test_cas_required_on_the_mount_or_on_one_secret(openbao: DevServer) -> None:
    openbao.enable_kv2("strict", cas_required=True)
    bare = openbao.request("POST", "strict/data/x", json={"data": {"a": 1}})
    assert (bare.status_code, bare.json()) == (400, {"errors": [CAS_REQUIRED]})
    assert openbao.request("GET", "strict/config").json()["data"]["cas_required"] is True
    assert openbao.kv_write("strict", "x", {"a": 1}, cas=0) == 1

    write(openbao, SECRET, {"client_secret": "a"})
    openbao.call("POST", f"secret/metadata/{SECRET}", json={"cas_required": True})
    bare = write(openbao, SECRET, {"client_secret": "b"})
    assert (bare.status_code, bare.json()) == (400, {"errors": [CAS_REQUIRED]})
    assert openbao.kv_metadata("secret", SECRET)["cas_required"] is True  # type: ignore[index]
    assert write(openbao, SECRET, {"client_secret": "b"}, cas=1).status_code == 200


# -- KV version 2: metadata and the server's clock --------------------------------------


def test_metadata_gives_current_version_versions_and_updated_time(openbao: DevServer) -> None:
    created = [write(openbao, SECRET, {"n": n}).json()["data"]["created_time"] for n in range(3)]

    meta = openbao.request("GET", f"secret/metadata/{SECRET}").json()["data"]
    assert meta["current_version"] == 3
    assert meta["oldest_version"] == 0  # 0 until max_versions prunes
    assert sorted(meta["versions"]) == ["1", "2", "3"]  # keys are strings
    assert meta["versions"]["2"] == {
        "created_time": created[1],
        "deletion_time": "",
        "destroyed": False,
    }
    assert meta["created_time"] == created[0]
    assert meta["updated_time"] == created[2]  # a data write stamps both
    assert {"cas_required", "max_versions", "custom_metadata", "delete_version_after"} <= set(meta)


def test_times_are_rfc3339_utc_with_up_to_nanoseconds(openbao: DevServer) -> None:
    stamps = [write(openbao, SECRET, {"n": n}).json()["data"]["created_time"] for n in range(5)]
    for stamp in stamps:
        assert stamp.endswith("Z")
        whole, _, fraction = stamp[:-1].partition(".")
        assert len(whole) == 19 and len(fraction) <= 9  # Go's RFC3339Nano drops trailing zeros
        parsed = datetime.fromisoformat(stamp)  # Python 3.11 reads it (to the microsecond)
        assert parsed.utcoffset() == timedelta(0)
    assert [datetime.fromisoformat(s) for s in stamps] == sorted(
        datetime.fromisoformat(s) for s in stamps
    )


def test_the_date_header_is_the_servers_clock_to_the_second(openbao: DevServer) -> None:
    """Date (Go's net/http, whole seconds, the answering node's clock) is never before the
    second in which the server stamped created_time (same clock, nanoseconds)."""
    for n in range(3):
        answer = write(openbao, SECRET, {"n": n})
        date = email.utils.parsedate_to_datetime(answer.headers["Date"])
        assert answer.headers["Date"].endswith(" GMT") and date.microsecond == 0
        created = datetime.fromisoformat(answer.json()["data"]["created_time"])
        assert created.replace(microsecond=0) <= date
        assert date - created < timedelta(minutes=1)  # loose: the same clock, not a timing


def test_health_reports_the_server_time_in_unix_seconds(openbao: DevServer) -> None:
    health = openbao.request("GET", "sys/health", token="")
    date = email.utils.parsedate_to_datetime(health.headers["Date"])
    assert health.json()["server_time_utc"] == int(date.timestamp())


def test_a_metadata_write_moves_updated_time_but_not_the_version(openbao: DevServer) -> None:
    """So a lease's age is its version's created_time, not the metadata's updated_time."""
    created = write(openbao, SECRET, {"a": 1}).json()["data"]["created_time"]
    openbao.call("POST", f"secret/metadata/{SECRET}", json={"custom_metadata": {"k": "v"}})
    meta = openbao.kv_metadata("secret", SECRET)
    assert meta is not None
    assert meta["current_version"] == 1
    assert meta["versions"]["1"]["created_time"] == created
    assert datetime.fromisoformat(meta["updated_time"]) > datetime.fromisoformat(created)


# -- KV version 2: delete and list ------------------------------------------------------


def test_list_gives_the_keys_under_a_prefix(openbao: DevServer) -> None:
    for broker in ("b2", "b1"):
        write(openbao, f"{SECRET}/brokers/{broker}", {"version": 1})
    write(openbao, f"{SECRET}/cycle", {"holder": "b1"})

    for path in (f"secret/metadata/{SECRET}/brokers/", f"secret/metadata/{SECRET}/brokers"):
        listed = openbao.request("LIST", path)
        assert listed.status_code == 200 and listed.json()["data"] == {"keys": ["b1", "b2"]}
    as_get = openbao.request("GET", f"secret/metadata/{SECRET}/brokers/", params={"list": "true"})
    assert as_get.json()["data"]["keys"] == ["b1", "b2"]
    # Folders end in "/"; the secret itself is not listed under its own name.
    assert openbao.call("LIST", f"secret/metadata/{SECRET}/")["data"]["keys"] == [
        "brokers/",
        "cycle",
    ]
    empty = openbao.request("LIST", f"secret/metadata/{SECRET}/nothing/")
    assert (empty.status_code, empty.json()) == (404, {"errors": []})
    assert openbao.kv_list("secret", f"{SECRET}/brokers") == ["b1", "b2"]
    assert openbao.kv_list("secret", f"{SECRET}/nothing") == []


def test_delete_on_data_is_soft_and_delete_on_metadata_removes_all(openbao: DevServer) -> None:
    report = f"{SECRET}/brokers/b1"
    write(openbao, report, {"version": 1})

    soft = openbao.request("DELETE", f"secret/data/{report}")
    assert soft.status_code == 204 and not soft.content
    read = openbao.request("GET", f"secret/data/{report}")
    # 404, yet with a body: the version exists, deleted (unlike an absent secret's {"errors": []})
    assert read.status_code == 404
    assert read.json()["data"]["data"] is None
    assert read.json()["data"]["metadata"]["deletion_time"] != ""
    assert openbao.call("LIST", f"secret/metadata/{SECRET}/brokers/")["data"]["keys"] == ["b1"]
    assert openbao.kv_metadata("secret", report)["current_version"] == 1  # type: ignore[index]

    for _ in range(2):  # idempotent: 204 when already gone
        gone = openbao.request("DELETE", f"secret/metadata/{report}")
        assert gone.status_code == 204
    assert openbao.request("GET", f"secret/data/{report}").json() == {"errors": []}
    assert openbao.request("LIST", f"secret/metadata/{SECRET}/brokers/").status_code == 404
    assert write(openbao, report, {"version": 2}, cas=0).json()["data"]["version"] == 1


# -- tokens and logins ------------------------------------------------------------------


def test_a_token_login_answer_and_renew_self(openbao: DevServer) -> None:
    openbao.put_policy("reader", READER_POLICY)
    created = openbao.call("POST", "auth/token/create", json={"policies": ["reader"], "ttl": "1h"})
    auth = created["auth"]
    assert (auth["lease_duration"], auth["renewable"]) == (3600, True)
    assert auth["policies"] == ["default", "reader"] and auth["token_type"] == "service"
    token = auth["client_token"]

    renewed = openbao.request("POST", "auth/token/renew-self", token=token, json={})
    assert renewed.status_code == 200
    assert renewed.json()["data"] is None
    r_auth = renewed.json()["auth"]
    assert r_auth["client_token"] == token  # the same token, a new lease
    assert (r_auth["lease_duration"], r_auth["renewable"]) == (3600, True)

    shorter = openbao.call("POST", "auth/token/renew-self", token=token, json={"increment": "60s"})
    assert shorter["auth"]["lease_duration"] == 60


def test_renewal_stops_at_the_max_ttl_with_a_warning(openbao: DevServer) -> None:
    token = openbao.create_token([], ttl="10s", explicit_max_ttl="12s")
    renewed = openbao.call("POST", "auth/token/renew-self", token=token, json={"increment": "1h"})
    assert renewed["auth"]["lease_duration"] <= 12
    # The max_ttl it names is what is left of the 12 s: "11s" when a second went by first.
    (warning,) = renewed["warnings"]
    left = re.fullmatch(
        r'TTL of "1h" exceeded the effective max_ttl of "(\d+)s"; TTL value is capped accordingly',
        warning,
    )
    assert left and renewed["auth"]["lease_duration"] <= int(left[1]) <= 12, warning


def test_a_token_that_is_not_renewable_says_so(openbao: DevServer) -> None:
    token = openbao.create_token([], ttl="1h", renewable=False)
    answer = openbao.request("POST", "auth/token/renew-self", token=token, json={})
    assert (answer.status_code, answer.json()) == (400, {"errors": ["lease is not renewable"]})


def test_without_the_default_policy_a_token_cannot_renew_itself(openbao: DevServer) -> None:
    """renew-self, lookup-self and capabilities-self come from the `default` policy."""
    openbao.put_policy("reader", READER_POLICY)
    token = openbao.create_token(["reader"], no_default_policy=True)
    for method, path in (
        ("POST", "auth/token/renew-self"),
        ("GET", "auth/token/lookup-self"),
        ("POST", "sys/capabilities-self"),
    ):
        answer = openbao.request(method, path, token=token, json={"paths": ["x"]})
        assert (answer.status_code, answer.json()) == (403, {"errors": POLICY_DENIED}), path
    assert openbao.request("GET", f"secret/metadata/{SECRET}", token=token).status_code == 404


def test_approle_login(openbao: DevServer) -> None:
    openbao.put_policy("reader", READER_POLICY)
    role_id, secret_id = openbao.approle("broker", ["reader"], token_ttl="20m")
    login = openbao.request(
        "POST", "auth/approle/login", token="", json={"role_id": role_id, "secret_id": secret_id}
    )
    assert login.status_code == 200
    auth = login.json()["auth"]
    assert (auth["lease_duration"], auth["renewable"]) == (1200, True)
    assert auth["policies"] == ["default", "reader"]
    assert auth["metadata"] == {"role_name": "broker"}
    assert auth["client_token"]
    write(openbao, SECRET, {"client_secret": "x"})
    assert openbao.kv_read("secret", SECRET, token=auth["client_token"]) is not None

    for wrong in (
        {"role_id": role_id, "secret_id": "nope"},
        {"role_id": "nope", "secret_id": secret_id},
    ):
        refused = openbao.request("POST", "auth/approle/login", token="", json=wrong)
        assert (refused.status_code, refused.json()) == (
            400,
            {"errors": ["invalid role or secret ID"]},
        )


SUBJECT = "system:serviceaccount:team-a:token-broker"


def test_jwt_login_with_a_static_public_key(openbao: DevServer) -> None:
    openbao.put_policy("reader", READER_POLICY)
    signer = openbao.jwt_auth(
        "broker", ["reader"], subject=SUBJECT, audience="vault", token_ttl="15m"
    )
    login = openbao.request(
        "POST",
        "auth/jwt/login",
        token="",
        json={"role": "broker", "jwt": signer.mint(SUBJECT, "vault")},
    )
    assert login.status_code == 200
    auth = login.json()["auth"]
    assert (auth["lease_duration"], auth["renewable"]) == (900, True)
    assert auth["policies"] == ["default", "reader"] and auth["metadata"] == {"role": "broker"}
    renewed = openbao.call("POST", "auth/token/renew-self", token=auth["client_token"], json={})
    assert renewed["auth"]["lease_duration"] == 900


@pytest.mark.parametrize(
    ("jwt", "error"),
    [
        (
            lambda s: s.mint("system:serviceaccount:team-a:other", "vault"),
            "error validating token: invalid subject (sub) claim",
        ),
        (
            lambda s: s.mint(SUBJECT, "elsewhere"),
            "error validating token: invalid audience (aud) claim: audience claim does not match"
            " any expected audience",
        ),
        (
            lambda s: s.mint(SUBJECT, "vault", now=0),
            "error validating token: invalid expiration time (exp) claim: token is expired",
        ),
        (
            lambda s: JwtSigner().mint(SUBJECT, "vault"),
            "error validating token: error verifying token signature: no known key successfully"
            " validated the token signature",
        ),
    ],
    ids=["subject", "audience", "expired", "other-key"],
)
def test_jwt_login_refusals(openbao: DevServer, jwt, error: str) -> None:  # type: ignore[no-untyped-def]
    signer = openbao.jwt_auth("broker", [], subject=SUBJECT, audience="vault")
    refused = openbao.request(
        "POST", "auth/jwt/login", token="", json={"role": "broker", "jwt": jwt(signer)}
    )
    assert (refused.status_code, refused.json()) == (400, {"errors": [error]})


def test_jwt_login_to_a_role_that_does_not_exist(openbao: DevServer) -> None:
    signer = openbao.jwt_auth("broker", [], subject=SUBJECT, audience="vault")
    refused = openbao.request(
        "POST",
        "auth/jwt/login",
        token="",
        json={"role": "nope", "jwt": signer.mint(SUBJECT, "vault")},
    )
    assert (refused.status_code, refused.json()) == (
        400,
        {"errors": ['role "nope" could not be found']},
    )


def test_the_kubernetes_auth_method_is_built_in(openbao: DevServer) -> None:
    openbao.enable_auth("kubernetes")
    assert "kubernetes/" in openbao.call("GET", "sys/auth")["data"]


# -- 403: denied by policy, or no valid token -------------------------------------------


def test_denied_by_policy_and_bad_token_are_both_403(openbao: DevServer) -> None:
    openbao.put_policy("reader", READER_POLICY)
    token = openbao.create_token(["reader"])
    write(openbao, SECRET, {"client_secret": "x"})

    denied = openbao.request("GET", "secret/data/elsewhere", token=token)
    assert (denied.status_code, denied.json()) == (403, {"errors": POLICY_DENIED})
    for bad in ("", "s.not-a-token"):
        answer = openbao.request("GET", f"secret/data/{SECRET}", token=bad)
        assert (answer.status_code, answer.json()) == (403, {"errors": TOKEN_DENIED})


def test_a_revoked_token_is_403(openbao: DevServer) -> None:
    openbao.put_policy("reader", READER_POLICY)
    token = openbao.create_token(["reader"])
    write(openbao, SECRET, {"client_secret": "x"})
    assert openbao.request("GET", f"secret/data/{SECRET}", token=token).status_code == 200

    openbao.revoke_token(token)
    for method, path in (("GET", f"secret/data/{SECRET}"), ("POST", "auth/token/renew-self")):
        answer = openbao.request(method, path, token=token, json={})
        assert (answer.status_code, answer.json()) == (403, {"errors": TOKEN_DENIED})


def test_an_expired_token_is_403(openbao: DevServer) -> None:
    openbao.put_policy("reader", READER_POLICY)
    token = openbao.create_token(["reader"], ttl="1s")
    write(openbao, SECRET, {"client_secret": "x"})

    expired = wait_for(
        lambda: (
            (r := openbao.request("GET", f"secret/data/{SECRET}", token=token)).status_code == 403
            and r
        ),
        what="the 1 s token to expire",
    )
    assert expired.json() == {"errors": TOKEN_DENIED}
    renew = openbao.request("POST", "auth/token/renew-self", token=token, json={})
    assert (renew.status_code, renew.json()) == (403, {"errors": TOKEN_DENIED})


# -- policies ---------------------------------------------------------------------------


def _prepare(bao: DevServer) -> None:
    write(bao, SECRET, {"client_secret": "current"})
    write(bao, f"{SECRET}/cycle", {"holder": "b0"})
    write(bao, f"{SECRET}/brokers/b0", {"version": 1})
    write(bao, "tb/other", {"client_secret": "not yours"})


DATA, META = f"secret/data/{SECRET}", f"secret/metadata/{SECRET}"

#: What a broker may try, in order (the report is created, then updated): method, path, body.
ATTEMPTS: dict[str, tuple[str, str, object]] = {
    "read secret": ("GET", DATA, None),
    "read metadata": ("GET", META, None),
    "create own report": ("POST", f"{DATA}/brokers/me", {"data": {"version": 1}}),
    "update own report": ("POST", f"{DATA}/brokers/me", {"data": {"version": 2}}),
    "write secret": ("POST", DATA, {"options": {"cas": 1}, "data": {"client_secret": "new"}}),
    "read cycle": ("GET", f"{DATA}/cycle", None),
    "write cycle": ("POST", f"{DATA}/cycle", {"options": {"cas": 1}, "data": {"holder": "me"}}),
    "list reports": ("LIST", f"{META}/brokers/", None),
    "read a report": ("GET", f"{DATA}/brokers/b0", None),
    "delete a report (data)": ("DELETE", f"{DATA}/brokers/b0", None),
    "delete a report (metadata)": ("DELETE", f"{META}/brokers/b0", None),
    "destroy the secret": ("DELETE", META, None),
    "read another secret": ("GET", "secret/data/tb/other", None),
    "write metadata": ("POST", META, {"max_versions": 1}),
}


def _can(bao: DevServer, token: str) -> dict[str, int]:
    """The status of each of ATTEMPTS, as ``token``."""
    return {
        name: bao.request(method, path, token=token, json=payload).status_code
        for name, (method, path, payload) in ATTEMPTS.items()
    }


#: What each policy may do of ATTEMPTS: the reader reads and reports; the cycler cycles too
#: (writes the secret and the cycle, reads and deletes reports); neither may destroy.
CAN = {
    "reader": {"read secret", "read metadata", "create own report", "update own report"},
    "cycler": {"read secret", "read metadata", "create own report", "update own report",
               "write secret", "read cycle", "write cycle", "list reports", "read a report",
               "delete a report (metadata)"},  # reports go with their metadata
}  # fmt: skip


@pytest.mark.parametrize(("role", "policy", "version"),
                         [("reader", READER_POLICY, 1), ("cycler", CYCLER_POLICY, 2)])  # fmt: skip
def test_each_policy_allows_what_its_role_needs_and_nothing_else(
    openbao: DevServer, role: str, policy: str, version: int
) -> None:
    openbao.put_policy(f"tb-{role}", policy)
    _prepare(openbao)
    got = _can(openbao, openbao.create_token([f"tb-{role}"]))
    allowed = {name for name, status in got.items() if status in (200, 204)}
    assert allowed == CAN[role], got
    assert {status for name, status in got.items() if name not in allowed} == {403}, got
    secret = {"client_secret": "new" if version == 2 else "current"}
    assert openbao.kv_read("secret", SECRET) == (secret, version)


def test_create_and_update_are_separate_and_neither_grants_read(openbao: DevServer) -> None:
    """A report needs both (first write creates, the next updates); the lease needs read too."""
    openbao.put_policy(
        "create-only", f'path "secret/data/{SECRET}/brokers/*" {{ capabilities = ["create"] }}'
    )
    token = openbao.create_token(["create-only"])
    assert write(openbao, f"{SECRET}/brokers/me", {"v": 1}, token=token).status_code == 200
    again = write(openbao, f"{SECRET}/brokers/me", {"v": 2}, token=token)
    assert (again.status_code, again.json()) == (403, {"errors": POLICY_DENIED})

    openbao.put_policy(
        "write-only", f'path "secret/data/{SECRET}/cycle" {{ capabilities = ["create", "update"] }}'
    )
    token = openbao.create_token(["write-only"])
    assert (
        write(openbao, f"{SECRET}/cycle", {"holder": "me"}, cas=0, token=token).status_code == 200
    )
    assert openbao.request("GET", f"secret/data/{SECRET}/cycle", token=token).status_code == 403


def test_capabilities_self_answers_what_a_policy_allows_without_trying(openbao: DevServer) -> None:
    """What `doctor` can ask before it writes anything."""
    openbao.put_policy("tb-reader", READER_POLICY)
    token = openbao.create_token(["tb-reader"])
    paths = [
        f"secret/data/{SECRET}",
        f"secret/metadata/{SECRET}",
        f"secret/data/{SECRET}/brokers/x",
        f"secret/data/{SECRET}/cycle",
    ]
    answer = openbao.call("POST", "sys/capabilities-self", token=token, json={"paths": paths})
    assert answer["data"] == {
        paths[0]: ["read"],
        paths[1]: ["read"],
        paths[2]: ["create", "update"],
        paths[3]: ["deny"],
    }


def test_the_mount_tells_its_kv_version_to_a_token_with_access(openbao: DevServer) -> None:
    """A v2 read on a v1 mount is a bare 404, like an absent secret: ask the mount instead."""
    openbao.call("POST", "sys/mounts/kv1", json={"type": "kv", "options": {"version": "1"}})
    openbao.put_policy("tb-reader", READER_POLICY)
    token = openbao.create_token(["tb-reader"])

    mount = openbao.call("GET", f"sys/internal/ui/mounts/secret/{SECRET}", token=token)["data"]
    assert (mount["path"], mount["type"], mount["options"]) == ("secret/", "kv", {"version": "2"})
    v1 = openbao.request("GET", "kv1/data/tb/adobe")
    assert (v1.status_code, v1.json()) == (404, {"errors": []})
    missing = openbao.request("GET", "nomount/data/tb/adobe")
    assert missing.status_code == 404
    assert missing.json()["errors"] == [
        'no handler for route "nomount/data/tb/adobe". route entry not found.'
    ]


# -- namespaces -------------------------------------------------------------------------


def test_namespaces_exist_and_the_header_selects_one(openbao: DevServer) -> None:
    nowhere = openbao.request(
        "GET", f"secret/data/{SECRET}", headers={"X-Vault-Namespace": "team-a"}
    )
    assert (nowhere.status_code, nowhere.json()) == (404, {"errors": ["namespace not found"]})

    openbao.call("POST", "sys/namespaces/team-a")
    ns = {"X-Vault-Namespace": "team-a"}
    openbao.call(
        "POST", "sys/mounts/secret", headers=ns, json={"type": "kv", "options": {"version": "2"}}
    )
    wait_for(
        lambda: openbao.request("GET", "secret/config", headers=ns).status_code == 200,
        what="KV v2 in the namespace",
    )
    openbao.call("POST", f"secret/data/{SECRET}", headers=ns, json={"data": {"client_secret": "A"}})
    write(openbao, SECRET, {"client_secret": "root's"})

    for header in ("team-a", "team-a/"):
        inside = openbao.call("GET", f"secret/data/{SECRET}", headers={"X-Vault-Namespace": header})
        assert inside["data"]["data"] == {"client_secret": "A"}
    as_path = openbao.call("GET", f"team-a/secret/data/{SECRET}")
    assert as_path["data"]["data"] == {"client_secret": "A"}
    assert openbao.kv_read("secret", SECRET) == ({"client_secret": "root's"}, 1)


# -- sealed and stopped -----------------------------------------------------------------


def test_a_sealed_server_answers_503(openbao: DevServer) -> None:
    write(openbao, SECRET, {"client_secret": "x"})
    openbao.seal()

    read = openbao.request("GET", f"secret/data/{SECRET}")
    assert (read.status_code, read.json()) == (503, {"errors": ["Vault is sealed"]})
    login = openbao.request("POST", "auth/approle/login", token="", json={"role_id": "r"})
    assert (login.status_code, login.json()) == (503, {"errors": ["Vault is sealed"]})
    health = openbao.request("GET", "sys/health", token="")
    assert health.status_code == 503
    assert (health.json()["initialized"], health.json()["sealed"]) == (True, True)

    openbao.unseal()
    assert openbao.kv_read("secret", SECRET) == ({"client_secret": "x"}, 1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_stopped_server_refuses_and_a_restart_keeps_the_data(
    openbao_raft: RaftServer, sig: signal.Signals
) -> None:
    bao = openbao_raft
    bao.enable_kv2("secret")
    token = bao.create_token([], ttl="1h")
    assert bao.kv_write("secret", SECRET, {"client_secret": "a"}, cas=0) == 1
    assert bao.kv_write("secret", SECRET, {"client_secret": "b"}, cas=1) == 2  # then at once:
    bao.stop(sig)

    with pytest.raises(httpx.ConnectError):
        httpx.get(bao.url + "/v1/sys/health", trust_env=False)

    bao.start(unseal=False)
    sealed = bao.request("GET", f"secret/data/{SECRET}")
    assert (sealed.status_code, sealed.json()) == (503, {"errors": ["Vault is sealed"]})
    bao.unseal()
    assert bao.kv_read("secret", SECRET) == ({"client_secret": "b"}, 2)
    refused = bao.request("POST", f"secret/data/{SECRET}", json={"options": {"cas": 1}, "data": {}})
    assert refused.json() == {"errors": [CAS_MISMATCH]}
    # Tokens survive too: a broker's login outlives a Vault restart.
    assert bao.request("GET", "auth/token/lookup-self", token=token).status_code == 200


# -- the test servers themselves --------------------------------------------------------


def test_the_root_token_stays_out_of_argv_the_log_and_home(openbao: DevServer) -> None:
    assert openbao.proc is not None
    argv = Path(f"/proc/{openbao.proc.pid}/cmdline").read_bytes()
    assert openbao.root_token.encode() not in argv
    assert openbao.root_token not in openbao.log_path.read_text()
    assert "Root Token: <redacted>" in openbao.output()  # the banner, read back redacted
    assert not (openbao.dir / ".vault-token").exists()  # -dev-no-store-token; HOME is dir


def test_dev_servers_started_at_once_each_get_a_port_of_their_own(openbao: DevServer) -> None:
    servers = [DevServer(openbao.binary) for _ in range(3)]
    threads = [threading.Thread(target=s.start) for s in servers]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ports = {s.port for s in [openbao, *servers]}
        assert len(ports) == 4 and 0 not in ports
        for s in servers:
            assert s.request("GET", "auth/token/lookup-self").status_code == 200
    finally:
        for s in servers:
            s.close()
    assert not any(s.dir.exists() or s.running() for s in servers)


def test_a_raft_restart_on_a_taken_port_says_which(openbao_raft: RaftServer) -> None:
    openbao_raft.stop()
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", openbao_raft.port))
    squatter.listen()
    try:
        with pytest.raises(RuntimeError, match=f"127.0.0.1:{openbao_raft.port} .* was taken"):
            openbao_raft.start()
    finally:
        squatter.close()
    openbao_raft.start()
    assert openbao_raft.request("GET", "sys/health", token="").status_code == 200
