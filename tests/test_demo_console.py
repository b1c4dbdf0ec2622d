"""The demo issuer's I/O Management API (client secrets), in-process under a fake clock."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import AsyncIterator

import httpx
import pytest
from helpers import FakeClock, wait_for
from issuer import TestIssuer

from broker.demo import MintRecord

NOW = 1_800_000_000.0
NOW_MS = "1800000000000"
CID, SECRET, ORG, CRED = "cid", "first-secret", "123456", "98765"
URL = f"/console/organizations/{ORG}/credentials/{CRED}/secrets"
MANAGE = (
    "AdobeID,openid,read_organizations,additional_info.projectedProductContext,"
    "additional_info.roles,adobeio_api,read_client_secret,manage_client_secrets"
)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
def issuer(clock: FakeClock) -> TestIssuer:
    issuer = TestIssuer(lifetime=3600.0, clock=clock)
    issuer.add_client(CID, SECRET)
    issuer.add_console(CID, ORG, CRED)
    return issuer


@pytest.fixture
async def client(issuer: TestIssuer) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=issuer)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="https://issuer.test") as c:
        yield c


async def token_answer(
    client: httpx.AsyncClient, secret: str = SECRET, client_id: str = CID, scope: str = MANAGE
) -> httpx.Response:
    form = {"grant_type": "client_credentials", "client_id": client_id,
            "client_secret": secret, "scope": scope}  # fmt: skip
    return await client.post("/ims/token/v3", data=form)


async def mint(client: httpx.AsyncClient, secret: str = SECRET, **kwargs: str) -> str:
    answer = await token_answer(client, secret, **kwargs)
    assert answer.status_code == 200, answer.text
    return answer.json()["access_token"]


def auth(token: str, api_key: str | None = CID) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"}
    if api_key is not None:
        headers["x-api-key"] = api_key
    return headers


def assert_console_error(answer: httpx.Response, status: int, code: str) -> None:
    assert answer.status_code == status, answer.text
    assert answer.json()["error_code"] == code
    assert isinstance(answer.json()["message"], str) and answer.json()["message"]
    assert answer.headers["content-type"] == "application/json"
    assert re.fullmatch(r"[0-9a-f]{32}", answer.headers["x-request-id"])


# Tokens: who minted them


async def test_token_records_client_secret_scopes_and_expiry(client, issuer, clock):
    clock.now += 5
    token = await mint(client)
    (first,) = issuer.secrets_of(CID)
    scopes = frozenset(MANAGE.split(","))
    assert len(scopes) == 8
    assert issuer.minted[token] == MintRecord(CID, first.uuid, scopes, NOW + 5 + 3600)
    assert issuer.issued[token] == NOW + 5 + 3600
    assert first.last_used_at == 1_800_000_005_000
    assert first.created_at == 1_800_000_000_000 and first.works_from == NOW
    assert SECRET not in repr(first)


async def test_space_separated_scopes_and_basic_auth(client, issuer):
    basic = base64.b64encode(f"{CID}:{SECRET}".encode()).decode()
    answer = await client.post(
        "/oauth2/token",
        data={"grant_type": "client_credentials", "scope": "openid  adobeio_api"},
        headers={"Authorization": f"Basic {basic}"},
    )
    assert answer.status_code == 200, answer.text
    minted = issuer.minted[answer.json()["access_token"]]
    assert minted.scopes == frozenset({"openid", "adobeio_api"})
    assert minted.client_id == CID


async def test_clients_view_still_edits_the_secrets(client, issuer):
    assert SECRET in issuer.clients[CID] and len(issuer.clients[CID]) == 1
    issuer.clients[CID].add("second")
    assert [s.value for s in issuer.secrets_of(CID)] == [SECRET, "second"]
    issuer.clients[CID].discard(SECRET)
    assert (await token_answer(client)).json()["error"] == "invalid_client"
    assert (await token_answer(client, "second")).status_code == 200
    issuer.clients[CID].clear()
    assert issuer.secrets_of(CID) == []


# GET, POST, DELETE


async def test_get_lists_secrets_without_values(client, issuer, clock):
    token = await mint(client)
    clock.now += 60
    second = issuer.add_client(CID, "second-secret")
    answer = await client.get(URL, headers=auth(token))
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert re.fullmatch(r"[0-9a-f]{32}", answer.headers["x-request-id"])
    first = issuer.secrets_of(CID)[0]
    assert answer.json() == {
        "client_id": CID,
        "client_secrets": [
            {
                "uuid": first.uuid,
                "created_at": NOW_MS,
                "expires_at": "PERMANENT",
                "secret_usages": [{"last_used_at": NOW_MS, "grant_type": "client_credentials"}],
            },
            {
                "uuid": second.uuid,
                "created_at": "1800000060000",
                "expires_at": "PERMANENT",
                "secret_usages": None,
            },
        ],
    }
    assert SECRET not in answer.text and "second-secret" not in answer.text


async def test_post_creates_a_secret_shown_once(client, issuer, clock):
    token = await mint(client)
    clock.now += 10
    answer = await client.post(URL, headers=auth(token))
    assert answer.status_code == 201, answer.text
    assert re.fullmatch(r"[0-9a-f]{32}", answer.headers["x-request-id"])
    body = answer.json()
    old, new = issuer.secrets_of(CID)
    assert body == {
        "client_id": CID,
        "uuid": new.uuid,
        "created_at": "1800000010000",
        "expires_at": "PERMANENT",
        "secret_usages": None,
        "client_secret": new.value,
    }
    assert new.value.startswith("p8e-") and len(new.value) > 30
    assert new.uuid != old.uuid and new.works and new.works_from == NOW + 10

    clock.now += 5
    await mint(client, new.value)
    listed = (await client.get(URL, headers=auth(token))).json()["client_secrets"]
    assert [s["uuid"] for s in listed] == [old.uuid, new.uuid]
    assert listed[1]["secret_usages"] == [
        {"last_used_at": "1800000015000", "grant_type": "client_credentials"}
    ]
    assert new.value not in json.dumps(listed)


async def test_post_refused_at_the_maximum(client, issuer):
    token = await mint(client)
    assert (await client.post(URL, headers=auth(token))).status_code == 201
    answer = await client.post(URL, headers=auth(token))
    assert_console_error(answer, 400, "400012")
    assert answer.json()["message"] == "maximum number of client secrets reached"
    assert len(issuer.secrets_of(CID)) == 2

    issuer.max_secrets = 3
    assert (await client.post(URL, headers=auth(token))).status_code == 201
    assert len(issuer.secrets_of(CID)) == 3


async def test_delete_removes_the_secret(client, issuer):
    token = await mint(client)
    created = (await client.post(URL, headers=auth(token))).json()
    old_uuid = issuer.secrets_of(CID)[0].uuid
    new_token = await mint(client, created["client_secret"])

    answer = await client.delete(f"{URL}/{old_uuid}", headers=auth(new_token))
    assert answer.status_code == 204
    assert answer.content == b"" and "content-type" not in answer.headers
    assert re.fullmatch(r"[0-9a-f]{32}", answer.headers["x-request-id"])
    assert [s.uuid for s in issuer.secrets_of(CID)] == [created["uuid"]]
    assert (await token_answer(client)).json()["error"] == "invalid_client"

    again = await client.delete(f"{URL}/{old_uuid}", headers=auth(new_token))
    assert_console_error(again, 404, "404002")
    assert again.json()["message"] == "secret not found"


async def test_unknown_console_paths_and_methods_are_404(client, issuer):
    token = await mint(client)
    for method, path in [
        ("GET", f"/console/organizations/{ORG}/credentials/{CRED}"),
        ("PUT", URL),
        ("DELETE", URL),
        ("POST", f"{URL}/some-uuid"),
        ("GET", f"{URL}/some-uuid/extra"),
    ]:
        answer = await client.request(method, path, headers=auth(token))
        assert answer.status_code == 404, (method, path)
        assert answer.json() == {"error": "not_found"}
    assert issuer.console_calls == []


# The checks, in order


async def test_bearer_token_must_be_minted_and_unexpired(client, issuer, clock):
    token = await mint(client)
    for headers in ({"x-api-key": CID}, auth("demo-not-minted"), {"Authorization": token}):
        answer = await client.get(URL, headers=headers)
        assert_console_error(answer, 401, "401013")
        assert answer.json()["message"] == "Oauth token is not valid"
    clock.now += 3600  # the token's lifetime is over
    assert_console_error(await client.post(URL, headers=auth(token)), 401, "401013")
    assert len(issuer.secrets_of(CID)) == 1


async def test_api_key_must_be_the_minting_client(client, issuer):
    issuer.add_client("other", "other-secret")
    token = await mint(client)
    for api_key in (None, "other", "CID"):
        answer = await client.get(URL, headers=auth(token, api_key))
        assert_console_error(answer, 403, "403003")
        assert answer.json()["message"] == "Api Key is invalid"
    # Checked before the scopes: a token without any scope is refused for its key first.
    bare = await mint(client, scope="openid")
    assert_console_error(await client.get(URL, headers=auth(bare, "other")), 403, "403003")


@pytest.mark.parametrize(
    ("method", "scope", "allowed"),
    [
        ("GET", "adobeio_api,read_client_secret", True),
        ("GET", "adobeio_api,manage_client_secrets", False),
        ("GET", "read_client_secret", False),
        ("POST", "adobeio_api,read_client_secret", False),
        ("POST", "adobeio_api,manage_client_secrets", True),
        ("POST", "AdobeID,openid,manage_client_secrets,read_client_secret", False),
        ("DELETE", "adobeio_api,read_client_secret", False),
        ("DELETE", "adobeio_api manage_client_secrets", True),
    ],
)
async def test_scopes_per_method(client, issuer, method, scope, allowed):
    other = issuer.add_client(CID, "second")
    token = await mint(client, scope=scope)
    path = f"{URL}/{other.uuid}" if method == "DELETE" else URL
    issuer.max_secrets = 3
    answer = await client.request(method, path, headers=auth(token))
    if allowed:
        assert answer.status_code in (200, 201, 204), answer.text
    else:
        assert_console_error(answer, 403, "403027")
        assert answer.json()["message"].startswith("insufficient scope")
        assert len(issuer.secrets_of(CID)) == 2


async def test_credential_must_be_bound_to_the_client(client, issuer):
    issuer.add_client("other", "other-secret")
    issuer.add_console("other", "654321", "11111")
    token = await mint(client)
    for path in (
        f"/console/organizations/{ORG}/credentials/11111/secrets",
        "/console/organizations/654321/credentials/11111/secrets",
        f"/console/organizations/654321/credentials/{CRED}/secrets",
    ):
        answer = await client.get(path, headers=auth(token))
        assert_console_error(answer, 404, "404001")
        assert answer.json()["message"] == "credential not found"
    # Checked after the scopes: a read-only token on a foreign credential is refused for scope.
    reader = await mint(client, scope="adobeio_api,read_client_secret")
    foreign = "/console/organizations/654321/credentials/11111/secrets"
    assert_console_error(await client.post(foreign, headers=auth(reader)), 403, "403027")
    assert len(issuer.secrets_of("other")) == 1


# New secrets at IMS


async def test_activation_delay(client, issuer, clock):
    issuer.activation_delay = 30.0
    token = await mint(client)
    value = (await client.post(URL, headers=auth(token))).json()["client_secret"]
    assert issuer.secrets_of(CID)[1].works_from == NOW + 30
    clock.now += 29.9
    assert (await token_answer(client, value)).json()["error"] == "invalid_client"
    clock.now += 0.1
    assert (await token_answer(client, value)).status_code == 200
    assert issuer.secrets_of(CID)[1].last_used_at == 1_800_000_030_000


async def test_new_secrets_that_never_work(client, issuer, clock):
    issuer.new_secrets_work = False
    token = await mint(client)
    value = (await client.post(URL, headers=auth(token))).json()["client_secret"]
    assert issuer.secrets_of(CID)[1].works is False
    clock.now += 3000
    assert (await token_answer(client, value)).json()["error"] == "invalid_client"
    assert issuer.secrets_of(CID)[1].last_used_at is None
    assert (await token_answer(client)).status_code == 200  # the old one still works


# Failing on command


async def test_unavailable_and_error500_apply_nothing(client, issuer):
    token = await mint(client)
    uuid = issuer.secrets_of(CID)[0].uuid
    issuer.console_mode = "unavailable"
    for method, path in (("GET", URL), ("POST", URL), ("DELETE", f"{URL}/{uuid}")):
        answer = await client.request(method, path, headers=auth(token))
        assert_console_error(answer, 503, "503000")
        assert answer.headers["retry-after"] == "2"
    assert_console_error(await client.get(URL), 503, "503000")  # before any check
    issuer.console_mode = "error500"
    for method, path in (("GET", URL), ("POST", URL), ("DELETE", f"{URL}/{uuid}")):
        assert_console_error(await client.request(method, path, headers=auth(token)), 500, "500000")
    assert [s.uuid for s in issuer.secrets_of(CID)] == [uuid]


async def test_post_lost_creates_a_secret_nobody_saw(client, issuer):
    token = await mint(client)
    issuer.console_mode = "post_lost"
    answer = await client.post(URL, headers=auth(token))
    assert_console_error(answer, 500, "500000")
    first, lost = issuer.secrets_of(CID)
    assert lost.value not in answer.text and "p8e-" not in answer.text
    issuer.console_mode = "ok"
    listed = (await client.get(URL, headers=auth(token))).json()["client_secrets"]
    assert [s["uuid"] for s in listed] == [first.uuid, lost.uuid]


async def test_post_garbage_creates_and_answers_nonsense(client, issuer):
    token = await mint(client)
    issuer.console_mode = "post_garbage"
    answer = await client.post(URL, headers=auth(token))
    assert answer.status_code == 200
    assert re.fullmatch(r"[0-9a-f]{32}", answer.headers["x-request-id"])
    with pytest.raises(ValueError):  # JSONDecodeError or UnicodeDecodeError
        answer.json()
    assert len(issuer.secrets_of(CID)) == 2
    assert issuer.secrets_of(CID)[1].value.encode() not in answer.content


async def test_delete_error_deletes_nothing(client, issuer):
    token = await mint(client)
    uuid = issuer.secrets_of(CID)[0].uuid
    issuer.console_mode = "delete_error"
    assert (await client.post(URL, headers=auth(token))).status_code == 201  # POST unaffected
    assert_console_error(await client.delete(f"{URL}/{uuid}", headers=auth(token)), 500, "500000")
    assert len(issuer.secrets_of(CID)) == 2


async def test_console_calls_are_recorded(client, issuer, clock):
    token = await mint(client)
    clock.now += 7
    await client.get(URL, headers=auth(token))
    await client.post(URL, headers=auth("demo-unknown"))
    first, second = issuer.console_calls
    assert (first.method, first.path, first.at) == ("GET", URL, NOW + 7)
    assert first.headers["authorization"] == f"Bearer {token}"
    assert first.headers["x-api-key"] == CID
    assert first.minted_by == issuer.secrets_of(CID)[0].uuid
    assert (second.method, second.minted_by) == ("POST", None)
    assert token not in repr(first)
    assert issuer.calls == 1  # console calls are not token calls


async def test_delay_applies_to_console_calls(client, issuer):
    token = await mint(client)
    issuer.delay = 0.2
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await client.get(URL, headers=auth(token))).status_code == 200
    assert loop.time() - started >= 0.2


# Holding requests


async def test_post_held_then_released_from_another_thread(client, issuer):
    token = await mint(client)
    issuer.hold = {"POST"}
    post = asyncio.create_task(client.post(URL, headers=auth(token)))

    def release_when_held() -> tuple[int, int]:
        wait_for(lambda: issuer.held == ["POST"], what="the POST to be held")
        count = len(issuer.secrets_of(CID))  # nothing applied yet
        return count, issuer.release()

    assert await asyncio.to_thread(release_when_held) == (1, 1)
    answer = await asyncio.wait_for(post, 5)
    assert answer.status_code == 201
    assert issuer.held == [] and len(issuer.secrets_of(CID)) == 2


async def test_post_applied_held_with_the_secret_created(client, issuer):
    token = await mint(client)
    issuer.hold = {"POST_APPLIED"}
    post = asyncio.create_task(client.post(URL, headers=auth(token)))
    await asyncio.to_thread(wait_for, lambda: issuer.held == ["POST_APPLIED"])
    created = issuer.secrets_of(CID)[1]  # exists while the answer is held
    assert not post.done()
    assert issuer.release("POST") == 0 and issuer.held == ["POST_APPLIED"]
    await asyncio.to_thread(issuer.release, "POST_APPLIED")
    answer = await asyncio.wait_for(post, 5)
    assert answer.json()["uuid"] == created.uuid
    assert answer.json()["client_secret"] == created.value


async def test_delete_held_before_deleting(client, issuer):
    token = await mint(client)
    second = issuer.add_client(CID, "second")
    issuer.hold = {"DELETE"}
    delete = asyncio.create_task(client.delete(f"{URL}/{second.uuid}", headers=auth(token)))
    await asyncio.to_thread(wait_for, lambda: issuer.held == ["DELETE"])
    assert second in issuer.secrets_of(CID)
    issuer.hold.clear()  # the next DELETE is not held
    await asyncio.to_thread(issuer.release)
    assert (await asyncio.wait_for(delete, 5)).status_code == 204
    assert second not in issuer.secrets_of(CID)


async def test_token_held_for_one_secret(client, issuer, clock):
    second = issuer.add_client(CID, "second")
    issuer.hold = {f"TOKEN:{second.uuid}"}
    held = asyncio.create_task(token_answer(client, "second"))
    await asyncio.to_thread(wait_for, lambda: issuer.held == [f"TOKEN:{second.uuid}"])
    assert (await token_answer(client)).status_code == 200  # the other secret is not held
    assert second.last_used_at is None and not held.done()
    clock.now += 3
    assert await asyncio.to_thread(issuer.release) == 1
    answer = await asyncio.wait_for(held, 5)
    assert answer.status_code == 200
    assert issuer.minted[answer.json()["access_token"]].secret_uuid == second.uuid
    assert second.last_used_at == 1_800_000_003_000


async def test_cancelled_held_request_is_no_longer_held(client, issuer):
    token = await mint(client)
    issuer.hold = {"POST"}
    post = asyncio.create_task(client.post(URL, headers=auth(token)))
    await asyncio.to_thread(wait_for, lambda: issuer.held == ["POST"])
    post.cancel()
    with pytest.raises(asyncio.CancelledError):
        await post
    assert issuer.held == [] and issuer.release() == 0
    assert len(issuer.secrets_of(CID)) == 1
