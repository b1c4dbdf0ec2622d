"""A hostile or misconfigured issuer, against the broker as a process.

The daemon must stop reading an answer that never ends (memory unchanged),
refuse tokens no tool could use, and name why an issuer cannot be reached
(TLS, refused...) in last_error, the log and doctor.
"""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
from helpers import IssuerThread, make_ca_and_leaf

H = {"X-Token-Broker": "1"}


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def test_an_answer_that_never_ends_does_not_fill_memory(start_broker, issuer):
    broker = start_broker(credential='timeout = "5s"\nforce_cooldown = "0s"')
    httpx.get(broker.url + "/token", headers=H).raise_for_status()
    before = rss_mb(broker.proc.proc.pid)
    issuer.issuer.mode = "endless"
    peak = before
    for _ in range(6):
        forced = httpx.post(broker.url + "/v1/credentials/main/refresh", headers=H, timeout=30)
        assert forced.status_code == 502, forced.text
        assert "invalid_response" in forced.json()["detail"]
        assert "longer than 1024 KiB" in forced.json()["detail"]
        peak = max(peak, rss_mb(broker.proc.proc.pid))
    # What the transport read ahead of the cap costs a few MB once; it must not add up.
    assert peak - before < 30, f"RSS grew by {peak - before:.0f} MB"
    # The cached token is still served meanwhile.
    assert httpx.get(broker.url + "/token", headers=H).status_code == 200


def test_a_huge_token_is_refused_not_served(start_broker, issuer):
    issuer.issuer.mode = "huge_token"
    broker = start_broker(wait=False)
    broker.proc.wait_healthy(broker.url)
    answer = httpx.get(broker.url + "/token", headers=H)
    assert answer.status_code == 503
    assert "access_token of 100000 characters" in answer.json()["last_error"]["description"]


@pytest.fixture
def tls_issuer(tmp_path):
    ca, leaf, key = make_ca_and_leaf(tmp_path, "private")
    thread = IssuerThread(certfile=str(leaf), keyfile=str(key)).start()
    thread.ca = ca  # type: ignore[attr-defined]
    yield thread
    thread.stop()


def test_an_untrusted_certificate_is_named_in_last_error_log_and_doctor(tls_issuer, start_broker):
    broker = start_broker(other_issuer=tls_issuer, wait=False)
    broker.proc.wait_healthy(broker.url)
    answer = httpx.get(broker.url + "/token", headers=H)
    assert answer.status_code == 503
    expected = f"TLS certificate verify failed for {tls_issuer.url}: unable to get local issuer"
    assert answer.json()["last_error"]["description"].startswith(expected), answer.text
    status = httpx.get(broker.url + "/v1/credentials/main", headers=H).json()
    assert status["last_error"]["description"].startswith(expected)
    assert expected in broker.proc.output()
    doctor = subprocess.run(
        [sys.executable, "-m", "broker", "doctor", "--config", str(broker.proc.config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert doctor.returncode == 1
    assert expected in doctor.stdout, doctor.stdout


def test_a_private_ca_is_trusted_through_ca_file(tls_issuer, start_broker):
    broker = start_broker(other_issuer=tls_issuer, credential=f'ca_file = "{tls_issuer.ca}"')
    assert httpx.get(broker.url + "/token", headers=H).status_code == 200


def test_a_private_ca_is_trusted_through_ssl_cert_file(tls_issuer, start_broker):
    broker = start_broker(other_issuer=tls_issuer, env={"SSL_CERT_FILE": str(tls_issuer.ca)})
    assert httpx.get(broker.url + "/token", headers=H).status_code == 200


def test_a_ca_file_that_is_not_pem_is_a_config_error(start_broker, tmp_path):
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate\n")
    broker = start_broker(credential=f'ca_file = "{bogus}"', wait=False)
    assert broker.proc.proc.wait(timeout=30) == 1
    assert f"[credentials.main] ca_file: {bogus} holds no usable PEM certificate" in (
        broker.proc.output()
    )
