from __future__ import annotations

import hmac
import tomllib

import helpers
import pytest

from broker import access, config
from broker.access import Access, Peer, key_digest, new_key
from broker.errors import ConfigError, Refused

CREDS = """
[credentials.a]
provider = "oauth2"
client_id = "x"
token_url = "http://127.0.0.1:1/t"
secret = "env:A"

[credentials.b]
provider = "oauth2"
client_id = "x"
token_url = "http://127.0.0.1:1/t"
secret = "env:B"
allow_uids = [1000]
allow_gids = [50]
"""


def settings(extra: str = ""):
    return helpers.settings(toml=CREDS + extra)


def client(name: str, key: str, creds: str) -> str:
    return f'[clients.{name}]\nkey_sha256 = "{key_digest(key).hex()}"\ncredentials = {creds}\n'


def request(key: str | None = None, peer: Peer | None = None, **ext) -> dict:
    headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
    extensions = {access.PEER: peer} if peer else {}
    extensions.update(ext)
    return {"headers": headers, "extensions": extensions}


def test_keys_are_random_prefixed_and_only_their_digest_is_kept():
    one, two = new_key(), new_key()
    assert one != two and one.startswith("tbk_") and len(one) >= 40
    s = settings(client("ci", one, '["a"]'))
    assert s.clients["ci"].key_sha256 == key_digest(one)
    assert one not in repr(s.clients["ci"])


def test_authenticate_compares_with_every_client_in_constant_time(monkeypatch):
    keys = [new_key() for _ in range(5)]
    toml = "".join(client(f"c{i}", k, '["a"]') for i, k in enumerate(keys))
    rules = Access(settings(toml))
    calls = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(access.hmac, "compare_digest", counting)
    assert rules.authenticate(request(keys[0])).name == "c0"
    assert len(calls) == 5  # no early exit on the first match
    calls.clear()
    with pytest.raises(Refused) as info:
        rules.authenticate(request(new_key()))
    assert info.value.http_status == 401 and info.value.rule == "bad_key" and len(calls) == 5


@pytest.mark.parametrize("header", [None, b"Bearer", b"Bearer  ", b"Basic dXNlcjpw", b"tbk_x"])
def test_missing_or_malformed_authorization_is_401(header):
    rules = Access(settings(client("ci", new_key(), '["a"]')))
    scope = {"headers": [(b"authorization", header)] if header else []}
    with pytest.raises(Refused) as info:
        rules.authenticate(scope)
    assert info.value.http_status == 401 and info.value.error_code == "unauthorized"


def test_no_clients_means_no_key_needed():
    rules = Access(settings())
    assert rules.authenticate(request()) is None
    assert not rules.open  # b is peer-restricted
    assert Access(helpers.settings()).open


def test_a_client_reads_only_its_credentials_and_cannot_probe_names():
    key = new_key()
    s = settings(client("ci", key, '["a"]'))
    rules = Access(s)
    ci = rules.authenticate(request(key))
    scope = request(key, **{access.CLIENT: ci})
    rules.authorize(scope, "a")
    for name in ("b", "missing"):
        with pytest.raises(Refused, match=f"client 'ci' may not read '{name}'"):
            rules.authorize(scope, name)
    with pytest.raises(Refused, match="may not reload"):
        rules.authorize_reload(scope)


def test_star_client_reads_everything_and_may_reload():
    key = new_key()
    rules = Access(settings(client("admin", key, '["*"]')))
    scope = request(key, **{access.CLIENT: rules.authenticate(request(key))})
    rules.authorize(scope, "a")
    rules.authorize(scope, "missing")  # the 404 comes later, from the manager
    rules.authorize_reload(scope)


@pytest.mark.parametrize(
    ("peer", "allowed"),
    [
        (Peer(1, 1000, frozenset({1000})), True),  # uid listed
        (Peer(1, 1001, frozenset({1001, 50})), True),  # a supplementary group listed
        (Peer(1, 1001, frozenset({1001})), False),
        (Peer(1, 0, frozenset({0})), False),  # root is not special
    ],
)
def test_peer_credentials_decide_restricted_credentials(peer, allowed):
    rules = Access(settings())
    if allowed:
        rules.authorize(request(peer=peer), "b")
    else:
        with pytest.raises(Refused, match=f"uid {peer.uid} may not read 'b'"):
            rules.authorize(request(peer=peer), "b")
    rules.authorize(request(peer=peer), "a")  # unrestricted


def test_a_restricted_credential_is_refused_over_tcp():
    with pytest.raises(Refused, match="only on a unix socket"):
        Access(settings()).authorize(request(), "b")


def test_config_validates_clients_and_remote_listen():
    key = new_key()
    with pytest.raises(ConfigError, match=r"\[clients.ci\] credentials: no credential named 'zz'"):
        settings(client("ci", key, '["zz"]'))
    with pytest.raises(ConfigError, match=r"\[clients.ci\] key_sha256"):
        settings('[clients.ci]\nkey_sha256 = "abc"\ncredentials = ["a"]\n')
    with pytest.raises(ConfigError, match=r"\[clients.ci\] credentials"):
        settings(f'[clients.ci]\nkey_sha256 = "{"0" * 64}"\ncredentials = []\n')
    with pytest.raises(ConfigError, match="loopback is required"):
        helpers.settings(server={"listen": ["0.0.0.0:8765"]})
    with pytest.raises(ConfigError, match="allow_remote: needs at least one"):
        helpers.settings(server={"listen": ["0.0.0.0:8765"], "allow_remote": True})
    doc = tomllib.loads(CREDS + client("ci", key, '["a"]'))
    doc["server"] = {"listen": ["10.1.2.3:8765"], "allow_remote": True}
    parsed = config.parse(doc)
    assert str(parsed.server.listen[0]) == "10.1.2.3:8765" and parsed.server.allow_remote
    doc["server"]["listen"] = ["myhost:8765"]
    with pytest.raises(ConfigError, match="an IP address, not a host name"):
        config.parse(doc)
    with pytest.raises(ConfigError, match=r"allow_uids"):
        helpers.settings(toml=CREDS.replace("allow_uids = [1000]", 'allow_uids = ["me"]'))


def test_a_request_is_judged_again_under_reloaded_rules():
    """What BrokerApp asks when a reload came while a request waited: its key, the names
    it read and the administrator rule, under the new rules; None when it still may."""
    key, admin = new_key(), new_key()
    before = Access(settings(client("ci", key, '["a"]') + client("ops", admin, '["*"]')))
    scope = request(key)
    scope["extensions"][access.CLIENT] = before.authenticate(scope)
    assert before.reauthorize(scope, ["a"]) is None
    # The key was replaced: 401. Its client may no longer read "a": 403. Keys gone: fine.
    replaced = Access(settings(client("ci", new_key(), '["a"]')))
    assert replaced.reauthorize(scope, ["a"]).http_status == 401  # type: ignore[union-attr]
    narrowed = Access(settings(client("ci", key, '["b"]')))
    denied = narrowed.reauthorize(scope, ["a"])
    assert denied is not None and (denied.http_status, denied.rule) == (403, "client")
    assert scope["extensions"][access.CLIENT].credentials == frozenset({"b"})  # judged anew
    assert Access(settings()).reauthorize(request(), ["a"]) is None
    # A peer-restricted credential read over TCP: 403 once the reload restricted it.
    assert Access(settings()).reauthorize(request(), ["b"]).rule == "peer_unknown"  # type: ignore[union-attr]
    # The administrator rule: an "ops" key narrowed to one credential may not cycle.
    ops = request(admin)
    narrowed = Access(settings(client("ops", admin, '["a"]')))
    denied = narrowed.reauthorize(ops, ["a"], admin="cycle secrets")
    assert denied is not None and "may not cycle secrets" in str(denied)
