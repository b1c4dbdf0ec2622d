"""The ASGI app in-process (httpx.ASGITransport) with a mocked issuer behind the manager."""

from __future__ import annotations

from pathlib import Path

import helpers
import httpx
import pytest
from helpers import HEADERS, FakeClock, FakeScheduler

from broker.api import create_app
from broker.manager import Manager
from broker.server import uvicorn_config

SECRET = "api-test-secret-value"
HTTP_API_DOC = Path(__file__).resolve().parents[1] / "docs" / "http-api.md"


@pytest.fixture
async def app(tmp_path):
    secret = tmp_path / "s"
    secret.write_text(SECRET)
    clock = FakeClock()
    calls = []

    def issuer(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(200, json={"access_token": "tok-api", "expires_in": 3600})

    settings = helpers.settings(
        {
            "adobe": {
                "provider": "adobe",
                "client_id": "cid",
                "secret": f"file:{secret}",
                "ims_url": "https://ims.test",
            },
            "never": {
                "provider": "adobe",
                "client_id": "cid2",
                "secret": f"file:{tmp_path}/missing",
            },
        },
        server={"default": "adobe"},
    )
    client = httpx.AsyncClient(transport=httpx.MockTransport(issuer))
    manager = Manager(settings, client=client, clock=clock, scheduler=FakeScheduler())
    application = create_app(manager, clock=clock)
    await manager.start()
    for credential in manager.credentials.values():
        if credential.inflight:
            await credential.inflight
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8765") as c:
        yield c
    await manager.close()


async def test_token_routes(app):
    r = await app.get("/token", headers=HEADERS)
    assert r.status_code == 200 and r.text == "tok-api"
    assert r.headers["cache-control"] == "no-store"
    assert (await app.get("/token/adobe", headers=HEADERS)).text == "tok-api"
    r = await app.get("/token/never", headers=HEADERS)
    assert r.status_code == 503 and r.json()["last_error"]["error"] == "secret_unavailable"
    assert "retry-after" in r.headers


async def test_no_cors_and_json_errors_for_unknown_routes(app):
    r = await app.get("/nope", headers=HEADERS)
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = await app.delete("/v1/credentials/adobe", headers=HEADERS)
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"
    r = await app.get("/token/..%2F..%2Fetc", headers=HEADERS)
    assert r.status_code == 404 and r.json()["error"] == "unknown_credential"
    for response in (r, await app.get("/token", headers=HEADERS)):
        assert not any(h.startswith("access-control") for h in response.headers)


async def test_metrics_and_readyz_reveal_nothing(app):
    await app.get("/token", headers=HEADERS)
    await app.get("/token/unknown-name-xyz", headers=HEADERS)
    await app.get("/token")
    metrics = (await app.get("/metrics")).text
    assert 'token_broker_token_requests_total{credential="adobe",outcome="ok"} 1' in metrics
    assert "token_broker_unknown_credential_requests_total 1" in metrics
    assert 'token_broker_rejected_requests_total{reason="header"} 1' in metrics
    assert 'token_broker_credential_state{credential="never",state="failed"} 1' in metrics
    assert "unknown-name-xyz" not in metrics
    ready = await app.get("/readyz")
    assert ready.status_code == 503
    assert ready.json() == {
        "error": "not_ready",
        "detail": "no servable token for: never",
        "credentials": {"adobe": "fresh", "never": "failed"},
    }
    everything = metrics + ready.text + (await app.get("/v1/credentials", headers=HEADERS)).text
    assert SECRET not in everything and "tok-api" not in everything


def test_a_forged_x_forwarded_for_never_changes_the_peer_uvicorn_reports():
    """Through real uvicorn with the broker's config: the app sees the socket's peer."""
    import asyncio
    import threading

    from helpers import loopback_socket

    from broker.server import Server

    seen: list[object] = []

    async def echo(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": message["type"] + ".complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        seen.append(scope["client"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    sock = loopback_socket()
    server = Server(uvicorn_config(echo))
    thread = threading.Thread(target=asyncio.run, args=(server.serve(sockets=[sock]),))
    thread.start()
    try:
        while not server.started:
            threading.Event().wait(0.01)
        port = sock.getsockname()[1]
        forged = {
            "X-Forwarded-For": "10.9.8.7",
            "X-Real-IP": "10.9.8.7",
            "Forwarded": "for=1.2.3.4",
        }
        assert httpx.get(f"http://127.0.0.1:{port}/", headers=forged).status_code == 204
    finally:
        server.request_exit()
        thread.join(10)
        sock.close()
    (client,) = seen
    assert client[0] == "127.0.0.1", client  # uvicorn's proxy-header handling is off


async def test_a_remote_peer_without_a_key_learns_no_credential_name(tmp_path):
    """With allow_remote, /metrics and /readyz named every credential, its state (and the
    output files) to any peer; without a key a remote peer now learns only the status."""
    from broker.access import key_digest, new_key

    secret = tmp_path / "s"
    secret.write_text(SECRET)
    key = new_key()
    settings = helpers.settings(
        {
            "adobe": {"provider": "adobe", "client_id": "cid", "secret": f"file:{secret}"},
            "never": {"provider": "adobe", "client_id": "c2", "secret": f"file:{secret}x"},
        },
        server={"allow_remote": True},
        clients={"ci": {"key_sha256": key_digest(key).hex(), "credentials": ["adobe"]}},
    )
    ok = httpx.Response(200, json={"access_token": "tok-api", "expires_in": 3600})
    client = httpx.AsyncClient(transport=httpx.MockTransport(lambda _: ok))
    manager = Manager(settings, client=client, clock=FakeClock(), scheduler=FakeScheduler())
    application = create_app(manager, clock=FakeClock())
    await manager.start()
    await manager.first_round()

    def peer(address: str) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=application, client=(address, 40000))
        return httpx.AsyncClient(transport=transport, base_url="http://10.0.0.9:8765")

    bearer = {"Authorization": f"Bearer {key}"}
    async with peer("10.0.0.5") as remote, peer("127.0.0.1") as local:
        assert (await remote.get("/healthz")).status_code == 200
        ready = await remote.get("/readyz")
        assert ready.status_code == 503 and ready.json()["error"] == "not_ready"
        metrics = await remote.get("/metrics")
        assert metrics.status_code == 401 and metrics.json()["error"] == "unauthorized"
        assert metrics.headers["www-authenticate"].startswith("Bearer")
        for answer in (ready, metrics):
            assert "adobe" not in answer.text and "never" not in answer.text
        wrong = await remote.get("/readyz", headers={"Authorization": "Bearer tbk_wrong"})
        assert wrong.status_code == 401
        # With a client key, as Prometheus presents it: the whole answer.
        metrics = await remote.get("/metrics", headers=bearer)
        assert metrics.status_code == 200 and 'credential="never"' in metrics.text
        ready = await remote.get("/readyz", headers=bearer)
        assert ready.json()["credentials"] == {"adobe": "fresh", "never": "failed"}
        # Loopback peers: as before, no key needed.
        assert 'credential="never"' in (await local.get("/metrics")).text
        assert (await local.get("/readyz")).json()["credentials"]["never"] == "failed"
    await manager.close()


async def test_every_status_field_is_named_in_the_http_api_docs(app):
    doc = HTTP_API_DOC.read_text()  # noqa: ASYNC240 (a small file, read once)
    row = next(
        line for line in doc.splitlines() if line.startswith("| `GET /v1/credentials/{name}`")
    )
    status = (await app.get("/v1/credentials/adobe", headers=HEADERS)).json()
    assert len(status) >= 11
    for key in status:
        assert f"`{key}`" in row, key
