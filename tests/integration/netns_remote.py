"""Run by test_remote.py inside a fresh network namespace (not collected on its own).

The namespace has 10.200.0.1 on its loopback device: an address that is not
loopback, so a request to it arrives from a non-loopback peer, as a request
from another host would, without touching the host's network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
from helpers import config_file, make_ca_and_leaf, reserve_port

from broker.access import key_digest, new_key

REMOTE = "10.200.0.1"
SERVER_IP, CLIENT_IP = "10.201.0.1", "10.201.0.2"
H = {"X-Token-Broker": "1"}


def test_a_remote_peer_is_served_only_with_a_client_key(start_broker, issuer):
    key = new_key()
    port = reserve_port(REMOTE)
    broker = start_broker(
        listen=(f"{REMOTE}:{port}",),
        server="allow_remote = true",
        extra=f'[clients.ci]\nkey_sha256 = "{key_digest(key).hex()}"\ncredentials = ["main"]\n',
    )
    url = f"http://{REMOTE}:{port}"
    assert httpx.get(url + "/healthz").status_code == 200
    refused = httpx.get(url + "/token", headers=H)
    assert refused.status_code == 401, refused.text
    token = httpx.get(url + "/token", headers={**H, "Authorization": f"Bearer {key}"})
    assert token.status_code == 200 and len(token.text) > 20
    # The Host rule still holds: only the literal address, never a name (DNS rebinding).
    rebound = httpx.get(
        url + "/token", headers={**H, "Authorization": f"Bearer {key}", "Host": "evil.example"}
    )
    assert rebound.status_code == 403 and "Host" in rebound.json()["detail"]
    assert key not in broker.proc.output()


def test_a_remote_peer_without_a_key_learns_no_name_and_no_path(start_broker, issuer, tmp_path):
    """/metrics and /readyz named every credential, its state and the output file paths to
    a remote peer without a key. Probes keep their status code; /metrics needs a key, as a
    Prometheus scrape config presents it (authorization: credentials_file)."""
    key = new_key()
    port = reserve_port(REMOTE)
    output = tmp_path / "secret-project.token"
    broker = start_broker(
        listen=(f"{REMOTE}:{port}",),
        server="allow_remote = true",
        extra=(f'[clients.prometheus]\nkey_sha256 = "{key_digest(key).hex()}"\n'
               f'credentials = ["main"]\n\n[[outputs]]\ncredential = "main"\n'
               f'path = "{output}"\n'),
    )  # fmt: skip
    url = f"http://{REMOTE}:{port}"
    assert httpx.get(url + "/healthz").status_code == 200
    ready = httpx.get(url + "/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}
    metrics = httpx.get(url + "/metrics")
    assert metrics.status_code == 401 and metrics.json()["error"] == "unauthorized"
    for answer in (ready, metrics):
        assert "main" not in answer.text and str(output) not in answer.text
    scraped = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {key}"})
    assert scraped.status_code == 200 and 'credential="main"' in scraped.text
    assert str(output) in scraped.text
    # On loopback nothing changed: probes and metrics need no key and name everything.
    assert httpx.get(broker.url + "/readyz").json()["credentials"] == {"main": "fresh"}
    assert 'credential="main"' in httpx.get(broker.url + "/metrics").text


def test_without_allow_remote_a_remote_listen_is_refused(tmp_path):
    cfg = config_file(tmp_path / "c.toml", server={"listen": [f"{REMOTE}:{reserve_port(REMOTE)}"]})
    done = subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1 and "loopback is required" in done.stderr


SERVICE = "token-broker.token-broker.svc"  # the cluster overlay's Service name
CLIENT_SCRIPT = r"""
import json, ssl, sys, httpx
url, ca, key, plain, service = sys.argv[1:6]
auth = {"X-Token-Broker": "1", "Authorization": "Bearer " + key}
ctx = ssl.create_default_context(cafile=ca)
out = {}
def get(name, **headers):
    try:
        r = httpx.get(url + "/token", headers={"X-Token-Broker": "1", **headers}, verify=ctx)
        out[name] = [r.status_code, r.text]
    except httpx.HTTPError as exc:
        out[name] = [0, type(exc).__name__]
get("key", Authorization="Bearer " + key)
get("no_key")
get("service_name", Authorization="Bearer " + key, Host=service)
get("evil_host", Authorization="Bearer " + key, Host="evil.example")
try:
    r = httpx.get(plain + "/token", headers=auth)
    out["plain_http"] = [r.status_code, r.text[:100]]
except httpx.HTTPError as exc:
    out["plain_http"] = [0, type(exc).__name__]
print(json.dumps(out))
"""


def test_cluster_mode_serves_the_main_api_over_tls_to_another_namespace(
    start_broker, issuer, tmp_path
):
    """DESIGN §12's cluster mode: tls_listen on a non-loopback address, a client key per
    workload, a client in a network namespace of its own (a pod elsewhere)."""
    ca, leaf, leaf_key = make_ca_and_leaf(tmp_path, "cluster", ips=(SERVER_IP,), dns=(SERVICE,))
    key = new_key()
    ns = f"tbcli{os.getpid()}"
    setup = [
        f"ip netns add {ns}",
        f"ip link add veth-srv type veth peer name veth-cli netns {ns}",
        f"ip addr add {SERVER_IP}/24 dev veth-srv",
        "ip link set veth-srv up",
        f"ip netns exec {ns} ip addr add {CLIENT_IP}/24 dev veth-cli",
        f"ip netns exec {ns} ip link set veth-cli up",
        f"ip netns exec {ns} ip link set lo up",
    ]
    try:
        for command in setup:
            subprocess.run(command.split(), check=True, timeout=30)
        port = reserve_port(SERVER_IP)
        broker = start_broker(
            server=(
                f'allow_remote = true\ntls_listen = ["{SERVER_IP}:{port}"]\n'
                f'tls_cert = "{leaf}"\ntls_key = "{leaf_key}"'
            ),
            extra=(
                f'[clients.app-a]\nkey_sha256 = "{key_digest(key).hex()}"\ncredentials = ["main"]\n'
            ),
        )
        client = tmp_path / "client.py"
        client.write_text(CLIENT_SCRIPT)
        done = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, str(client),
             f"https://{SERVER_IP}:{port}", str(ca), key, f"http://{SERVER_IP}:{port}", SERVICE],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        seen = json.loads(done.stdout)
        token = httpx.get(broker.url + "/token", headers={**H, "Authorization": f"Bearer {key}"})
        assert seen["key"] == [200, token.text]  # over TLS, from another namespace
        assert seen["no_key"][0] == 401
        assert seen["service_name"][0] == 200  # a name the certificate holds
        assert seen["evil_host"][0] == 403  # any other name: DNS rebinding stays out
        assert seen["plain_http"][0] == 0  # plain HTTP to the TLS port gets nothing
        assert key not in broker.proc.output()
    finally:
        subprocess.run(["ip", "netns", "del", ns], timeout=30)
