"""Who may read which token, against the broker as a process (issue: security in depth).

Client keys on TCP, peer credentials on a unix socket (with a second local
user, ``nobody``, when the machine has one and curl to speak for it), and
the ``client`` commands end to end.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from helpers import wait_for

from broker.access import key_digest, new_key
from broker.cli import main

H = {"X-Token-Broker": "1"}


def clients_toml(**clients: tuple[str, list[str]]) -> str:
    """[clients.NAME] tables for (key, credentials) pairs."""
    out = []
    for name, (key, creds) in clients.items():
        out.append(
            f'[clients.{name}]\nkey_sha256 = "{key_digest(key).hex()}"\n'
            f"credentials = {json.dumps(creds)}\n"
        )
    return "\n".join(out)


OTHER = """
[credentials.other]
provider = "oauth2"
client_id = "broker-client"
token_url = "{url}/oauth2/token"
secret = "env:OTHER_SECRET"
"""


def test_client_keys_decide_which_token_a_request_may_read(start_broker, issuer):
    main_key, other_key, admin_key = new_key(), new_key(), new_key()
    extra = OTHER.format(url=issuer.url) + clients_toml(
        reader=(main_key, ["main"]), otherreader=(other_key, ["other"]), admin=(admin_key, ["*"])
    )
    issuer.issuer.add_client("broker-client", "other-secret-value")
    broker = start_broker(
        extra=extra, server='default = "main"', env={"OTHER_SECRET": "other-secret-value"}
    )

    def get(path: str, key: str | None = None, **headers: str) -> httpx.Response:
        auth = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.get(broker.url + path, headers={**H, **auth, **headers})

    # No key, a malformed header, a wrong key: 401 with a Bearer challenge.
    for response in (
        get("/token"),
        get("/token/main", **{"Authorization": "Basic abc"}),
        get("/token/main", new_key()),
        get("/v1/credentials"),
    ):
        assert response.status_code == 401, response.text
        assert response.json()["error"] == "unauthorized"
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert "token" not in response.text.lower() or "access_token" not in response.text
    # The header guard still comes first: a key without X-Token-Broker is 403.
    no_header = httpx.get(broker.url + "/token", headers={"Authorization": f"Bearer {main_key}"})
    assert no_header.status_code == 403
    # The right key reads its own credential, and nothing else (existing or not: no probing).
    assert get("/token", main_key).status_code == 200
    assert get("/token/main", main_key).text == get("/token", admin_key).text
    for path in ("/token/other", "/token/nonexistent", "/v1/credentials/other/token"):
        refused = get(path, main_key)
        assert refused.status_code == 403, (path, refused.text)
        assert refused.json()["error"] == "forbidden"
    assert get("/token/other", other_key).status_code == 200
    assert get("/token/main", other_key).status_code == 403
    assert get("/token/nonexistent", admin_key).status_code == 404
    # Status routes show only what the client may read; reload needs "*".
    assert [c["name"] for c in get("/v1/credentials", main_key).json()] == ["main"]
    assert {c["name"] for c in get("/v1/credentials", admin_key).json()} == {"main", "other"}
    auth = {**H, "Authorization": f"Bearer {main_key}"}
    assert httpx.post(broker.url + "/v1/reload", headers=auth).status_code == 403
    auth["Authorization"] = f"Bearer {admin_key}"
    assert httpx.post(broker.url + "/v1/reload", headers=auth).status_code == 200
    # Probes and metrics stay open (they reveal no token), and count the refusals.
    metrics = httpx.get(broker.url + "/metrics").text
    assert 'token_broker_rejected_requests_total{reason="bad_key"} 1' in metrics
    assert 'token_broker_rejected_requests_total{reason="client"}' in metrics
    broker.proc.stop()
    out = broker.proc.output()
    for key in (main_key, other_key, admin_key):
        assert key not in out


def test_client_add_prints_a_key_once_and_the_daemon_uses_it(start_broker, capsys):
    broker = start_broker()
    cfg = broker.proc.config
    # The first client: the daemon has no clients yet, so the reload needs no key.
    assert main(["client", "add", "ci", "--credentials", "main", "--config", str(cfg)]) == 0
    out, err = capsys.readouterr()
    key = out.strip()
    assert key.startswith("tbk_") and len(key) > 40
    assert "the running daemon reloaded" in err
    text = cfg.read_text()
    assert key not in text and key_digest(key).hex() in text
    assert httpx.get(broker.url + "/token", headers=H).status_code == 401
    token = httpx.get(broker.url + "/token", headers={**H, "Authorization": f"Bearer {key}"})
    assert token.status_code == 200
    # The CLI asks the daemon with the key from the environment or a file, never argv.
    os.environ["TOKEN_BROKER_CLIENT_KEY"] = key
    try:
        assert main(["token", "--config", str(cfg)]) == 0
        assert capsys.readouterr().out.strip() == token.text
    finally:
        del os.environ["TOKEN_BROKER_CLIENT_KEY"]
    assert main(["token", "--config", str(cfg)]) == 1
    assert "client key is required" in capsys.readouterr().err
    key_file = cfg.with_name("key")
    key_file.write_text(key + "\n")
    assert main(["token", "--config", str(cfg), "--key-file", str(key_file)]) == 0
    capsys.readouterr()
    # A second client needs an admin key for the daemon to reload: it says so.
    assert main(["client", "add", "ci", "--credentials", "main", "--config", str(cfg)]) == 1
    assert "exists already" in capsys.readouterr().err
    rc = main(["client", "add", "ci", "--replace", "--credentials", "main", "--config", str(cfg)])
    assert rc == 1  # the config is written, the daemon did not take it: an error
    new, err = capsys.readouterr()
    assert "refused to reload" in err and "client key" in err
    os.kill(broker.proc.proc.pid, 1)  # SIGHUP: the operator's way
    wait_for(lambda: token_status(broker.url, key) == 401)
    assert token_status(broker.url, new.strip()) == 200
    assert main(["client", "list", "--json", "--config", str(cfg)]) == 0
    assert json.loads(capsys.readouterr().out) == {"clients": {"ci": ["main"]}}
    assert main(["client", "remove", "ci", "--config", str(cfg)]) == 1  # no key to reload
    assert "kill -HUP" in capsys.readouterr().err
    os.kill(broker.proc.proc.pid, 1)
    wait_for(lambda: token_status(broker.url, None) == 200)
    broker.proc.stop()
    assert key not in broker.proc.output() and new.strip() not in broker.proc.output()


def token_status(url: str, key: str | None) -> int:
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(url + "/token", headers={**H, **auth}).status_code


# -- peer credentials on the unix socket ----------------------------------------------


def _nobody() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        return None


@pytest.fixture
def shared_dir() -> Path:
    """A directory other users may enter (pytest's tmp dirs are 0700)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="tb-peer-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def curl_as(
    user: pwd.struct_passwd | None, sock: Path, path: str, method: str = "GET"
) -> tuple[int, str]:
    """``method`` ``path`` over the unix socket as ``user`` (None: as ourselves), with curl."""
    command = ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "--unix-socket", str(sock),
               "-X", method, "-H", "X-Token-Broker: 1", f"http://localhost{path}"]  # fmt: skip
    kwargs = {}
    if user is not None:
        kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"}, **kwargs
    )
    body, _, status = done.stdout.rpartition("\n")
    return int(status), body


def _second_user() -> pwd.struct_passwd:
    """``nobody``, to speak as a second local user (skip, or in CI fail, without one)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as a second local user")
    nobody = _nobody()
    if nobody is None or shutil.which("curl") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must have the user nobody and curl (see .ci/run)")
        pytest.skip("no user 'nobody' or no curl on this machine")
    return nobody


def test_allow_uids_and_gids_are_checked_with_so_peercred(start_broker, issuer, shared_dir):
    nobody = _second_user()
    sock = shared_dir / "broker.sock"
    extra = OTHER.format(url=issuer.url) + f"allow_gids = [{nobody.pw_gid}]\n"
    issuer.issuer.add_client("broker-client", "other-secret-value")
    broker = start_broker(
        credential="allow_uids = [0]",
        listen=(f"unix:{sock}",),
        server='socket_mode = "0666"',
        extra=extra,
        env={"OTHER_SECRET": "other-secret-value"},
        wait=False,
    )
    broker.proc.wait_healthy("http://localhost", uds=str(sock))
    # root (uid 0) is in main's allow_uids; nobody is not, but is in other's allow_gids.
    status, root_token = curl_as(None, sock, "/token/main")
    assert status == 200 and len(root_token) > 20
    status, body = curl_as(nobody, sock, "/token/main")
    assert status == 403, body
    assert f"uid {nobody.pw_uid} may not read 'main'" in body
    assert root_token not in body
    status, body = curl_as(nobody, sock, "/v1/credentials")
    assert status == 200 and [c["name"] for c in json.loads(body)] == ["other"]
    assert curl_as(nobody, sock, "/token/other")[0] == 200
    assert curl_as(None, sock, "/token/other")[0] == 403  # root is not in other's groups
    # Over TCP nobody's user cannot be known: a restricted credential is not served there.
    tcp = httpx.get(f"{broker.url}/token/main", headers=H)
    assert tcp.status_code == 403 and "only on a unix socket" in tcp.json()["detail"]


def test_rotate_is_for_who_may_refresh_and_not_again_within_the_cooldown(
    start_broker, issuer, shared_dir, tmp_path
):
    """POST .../rotate ignored allow_uids: nobody (403 on /token and .../refresh) and any TCP
    peer got 200, a new secret at Adobe and the old one deleted, and three back-to-back
    calls ran three cycles. The stand-in Console is the demo issuer's."""
    nobody = _second_user()
    issuer.issuer.add_console("broker-client", "4711", "88301")
    sock = shared_dir / "broker.sock"
    cycling = (f'allow_uids = [0]\nconsole_url = "{issuer.url}"\ncredential_id = "88301"\n'
               'console_org_id = "4711"')  # fmt: skip
    broker = start_broker(
        credential=cycling,
        listen=(f"unix:{sock}",),
        server='socket_mode = "0666"',
        env={"XDG_STATE_HOME": str(tmp_path / "state")},
        wait=False,
    )
    broker.proc.wait_healthy("http://localhost", uds=str(sock))
    rotate = "/v1/credentials/main/rotate"

    def posts() -> int:
        return len([c for c in issuer.issuer.console_calls if c.method == "POST"])

    # nobody may not read main: refused on /token, .../refresh and .../rotate alike.
    for path, method in (("/token/main", "GET"), ("/v1/credentials/main/refresh", "POST"),
                         (rotate, "POST")):  # fmt: skip
        status, body = curl_as(nobody, sock, path, method)
        assert status == 403, (path, body)
        assert f"uid {nobody.pw_uid} may not read 'main'" in body and "secret_cycling" not in body
    # Over TCP the user is unknown: refused as the token is.
    tcp = httpx.post(broker.url + rotate, headers=H)
    assert tcp.status_code == 403 and "only on a unix socket" in tcp.json()["detail"]
    assert posts() == 0 and len(issuer.issuer.secrets_of("broker-client")) == 1
    # root may read it, and cycles once; asking again at once is a 429 that says when.
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=60) as root:
        first = root.post("http://localhost" + rotate, headers=H)
        assert first.status_code == 200, first.text
        assert first.json()["outcome"] == "success" and first.json()["status"]["name"] == "main"
        for _ in range(2):
            again = root.post("http://localhost" + rotate, headers=H)
            assert again.status_code == 429, again.text
            assert again.json()["error"] == "rotate_cooldown"
            assert 590 <= int(again.headers["retry-after"]) <= 600
            detail = again.json()["detail"]
            assert "the last secret cycle ran at " in detail and "may be asked for from" in detail
    assert posts() == 1 and len(issuer.issuer.secrets_of("broker-client")) == 1
    metrics = httpx.get(broker.url + "/metrics").text
    assert 'token_broker_secret_rotations_total{credential="main",outcome="success"} 1' in metrics


class _AnyToken(set):  # type: ignore[type-arg]
    """An issuer ``hold`` that holds every token request, whatever the secret's uuid."""

    def __contains__(self, event: object) -> bool:
        return str(event).startswith("TOKEN:")


def test_a_key_removed_by_a_reload_is_refused_to_a_request_waiting_on_a_token(start_broker, issuer):
    """Authenticated when it arrived, a request then waited for a token; a reload removed
    its key meanwhile. It got the token: now the answer is made under the rules in force."""
    from rawhttp import RawRequest

    key, replaced, admin = new_key(), new_key(), new_key()
    issuer.issuer.hold = _AnyToken()  # the first token is on its way until released

    def auth(key: str) -> dict[str, str]:
        return {**H, "Authorization": f"Bearer {key}"}

    broker = start_broker(
        extra=clients_toml(reader=(key, ["main"]), admin=(admin, ["*"])), wait=False
    )
    try:
        broker.proc.wait_healthy(broker.url)
        wait_for(lambda: issuer.issuer.held, what="the first token request, held")
        head = ("{} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Token-Broker: 1\r\nContent-Length: 0\r\n"
                f"Authorization: Bearer {key}\r\nConnection: close\r\n\r\n")  # fmt: skip
        waiting = [
            RawRequest(broker.port, head.format(line))
            for line in (
                "GET /token/main",
                "GET /v1/credentials/main/token",
                "POST /v1/credentials/main/refresh",
            )  # fmt: skip
        ]
        # After them on the same event loop: their heads are in, and they wait.
        assert httpx.get(broker.url + "/v1/credentials", headers=auth(key)).status_code == 200
        # `token-broker client add reader --replace`, and the reload it asks for.
        cfg = broker.proc.config
        cfg.write_text(cfg.read_text().replace(key_digest(key).hex(), key_digest(replaced).hex()))
        reloaded = httpx.post(broker.url + "/v1/reload", headers=auth(admin))
        assert reloaded.status_code == 200, reloaded.text
    finally:
        issuer.issuer.hold = set()
        issuer.issuer.release()
    token = httpx.get(broker.url + "/token/main", headers=auth(replaced)).text
    for request in waiting:
        status, headers, body = request.answer()
        assert (status, body.get("error")) == (401, "unauthorized"), (status, body)
        assert token not in json.dumps(body) and headers["www-authenticate"].startswith("Bearer")
    metrics = httpx.get(broker.url + "/metrics").text
    assert 'token_broker_rejected_requests_total{reason="bad_key"} 3' in metrics
