"""The Grafana dashboard (deploy/grafana/token-broker.json) queries what a broker exposes.

Every panel's PromQL is evaluated with promtool over one scrape of a real broker
process (see tests/promql.py) and must return series; the dashboard covers
what docs/observability.md promises: token time left and refresh outcomes per
credential, issuer latency, requests by outcome, cycles and secret age.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from promql import Scrape, broker_scrape, evaluate, promtool

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "token-broker.json"


def panels() -> list[dict]:
    return json.loads(DASHBOARD.read_text())["panels"]


@pytest.fixture(scope="module")
def scrape(tmp_path_factory) -> Scrape:  # type: ignore[no-untyped-def]
    promtool()  # skip before starting anything if it is missing
    yield from broker_scrape(tmp_path_factory.mktemp("dashboard"))


def test_the_dashboard_covers_what_the_docs_promise():
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "token-broker" and board["schemaVersion"] >= 36
    exprs = " ".join(t["expr"] for p in panels() for t in p["targets"])
    for metric in (
        "token_broker_token_expires_in_seconds",  # token time left
        "token_broker_refreshes_total",  # refresh outcomes
        "token_broker_issuer_request_duration_seconds_bucket",  # issuer latency
        "token_broker_token_requests_total",  # requests by outcome
        "token_broker_secret_rotations_total",  # cycles
        "token_broker_secret_age_seconds",  # secret age
    ):
        assert metric in exprs, metric
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids))
    for panel in panels():
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["description"], panel["title"]
        for target in panel["targets"]:
            # Per credential where the metric has one; summed over pod/instance labels.
            if "{{credential}}" in target["legendFormat"]:
                assert 'credential=~"$credential"' in target["expr"], panel["title"]
            assert re.search(r"\b(sum|min|max|count|histogram_quantile)\b", target["expr"])
    names = [v["name"] for v in board["templating"]["list"]]
    assert names == ["datasource", "credential"]


def test_every_panel_query_returns_series_from_a_real_broker(scrape, tmp_path):
    exprs = [t["expr"] for p in panels() for t in p["targets"]]
    evaluate(scrape, exprs, tmp_path)


def test_a_query_of_a_metric_the_broker_lacks_fails(scrape, tmp_path):
    """The check can fail: a misspelt metric returns nothing, and promtool says so."""
    with pytest.raises(AssertionError, match="token_broker_token_expire_in_seconds"):
        evaluate(scrape, ["min by (credential) (token_broker_token_expire_in_seconds)"], tmp_path)


def test_every_family_the_broker_can_expose_is_documented_with_its_type():
    """docs/observability.md's tables name every family /metrics can hold, with its type:
    render() with every feature's series present (outputs, cycling, listeners, Vault)."""
    from collections import Counter
    from types import SimpleNamespace

    from broker.metrics import Gauges, Recorder, RequestCounters, render

    recorder, counters = Recorder(), RequestCounters()
    recorder.refreshed("adobe", "success")
    recorder.issuer_latency("adobe", 0.1)
    recorder.output("/run/t", "write", "ok")
    recorder.output("/run/t", "command", "ok")
    recorder.rotated("adobe", "success")
    counters.tokens[("adobe", "ok")] += 1
    counters.connections["127.0.0.1:8765"] = {1}
    counters.connection_limits["127.0.0.1:8765"] = 100
    counters.refused_connections["127.0.0.1:8765"] += 1
    counters.idle_closed["127.0.0.1:8765"] += 1
    counters.handshake_failures[("127.0.0.1:8443", "timeout")] += 1
    gauges = [Gauges("adobe", "fresh", 100.0, 1.0, secret_age=5.0, secret_version=3)]
    vault = SimpleNamespace(ok=False, errors=Counter({"denied": 1}))
    text = render(recorder, counters, gauges, vault)
    exposed = set(re.findall(r"^# TYPE (token_broker_\w+) (\w+)$", text, re.M))
    doc = (DASHBOARD.parents[2] / "docs" / "observability.md").read_text()
    documented = set(re.findall(r"^\| `(token_broker_\w+)` \| (\w+) \|", doc, re.M))
    assert len(exposed) >= 20
    assert exposed <= documented, sorted(exposed - documented)
    assert {name for name, _ in documented} <= {name for name, _ in exposed}
