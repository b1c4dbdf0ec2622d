"""PromQL checked against what a real broker exposes: scrape it, evaluate with promtool.

No Prometheus server runs in the tests. Instead a broker process (with secret
cycling and a file output, so that every series family exists) is scraped
once, its samples become the ``input_series`` of a ``promtool test rules``
file (counters rising by their scraped value every minute, gauges constant),
and each expression is evaluated there: it must return at least one series.
A query that names a metric the broker does not expose, a label it does not
have, or that does not parse fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from helpers import HEADERS, BrokerProcess, IssuerThread, config_file, reserve_port, wait_for

#: What Grafana substitutes at query time, and what stands in for it here.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$credential": ".*"}
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?P<labels>\{.*\})?\s+(?P<value>\S+)$")


def promtool() -> str:
    """The promtool binary, or skip (fail in CI, which installs it)."""
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must have promtool (Debian package prometheus, see .ci/run)")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return found


@dataclass(frozen=True)
class Scrape:
    """One scrape of a broker's /metrics: each family's type, and every sample."""

    types: dict[str, str]
    samples: list[tuple[str, str, float]]  # (name, "{labels}" or "", value)

    @classmethod
    def parse(cls, text: str) -> Scrape:
        types: dict[str, str] = {}
        samples = []
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split()
                types[name] = kind
            elif line and not line.startswith("#"):
                found = _SAMPLE.match(line)
                assert found, f"not a sample line: {line!r}"
                samples.append((found["name"], found["labels"] or "", float(found["value"])))
        return cls(types, samples)

    def kind(self, name: str) -> str:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        return self.types.get(name) or self.types.get(base, "untyped")

    def input_series(self, steps: int = 20) -> list[dict[str, str]]:
        """The samples as promtool series, one value a minute for ``steps`` minutes."""
        series = []
        for name, labels, value in self.samples:
            rising = self.kind(name) in ("counter", "histogram")
            values = f"0+{value:g}x{steps}" if rising else f"{value:g}x{steps}"
            series.append({"series": f"{name}{labels}", "values": values})
        return series


def substitute(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def evaluate(scrape: Scrape, exprs: list[str], tmp_path: Path) -> None:
    """Assert that every expression returns at least one series over ``scrape``."""
    assert exprs
    (tmp_path / "none.yml").write_text("groups: []\n")
    tests = {
        "rule_files": ["none.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": scrape.input_series(),
                "promql_expr_test": [
                    {
                        # count() of nothing is nothing: "returns series" is exactly value 1
                        "expr": f"count(({substitute(expr)})) > bool 0",
                        "eval_time": "15m",
                        "exp_samples": [{"labels": "{}", "value": 1}],
                    }
                    for expr in exprs
                ],
            }
        ],
    }
    path = tmp_path / "queries_test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    done = subprocess.run(
        [promtool(), "test", "rules", path.name],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def broker_scrape(tmp_path: Path) -> Iterator[Scrape]:
    """A real broker process scraped once every series family has a sample: refreshes
    that succeeded and one that failed, a secret cycle (through the issuer's I/O
    Management API, every 5 s), a file output, a token served, a refusal, an unknown name."""
    issuer = IssuerThread().start()
    try:
        secret_file = tmp_path / "adobe.secret"
        secret_file.write_text("first-secret\n")
        secret_file.chmod(0o600)
        issuer.issuer.add_client("adobe-client", "first-secret")
        issuer.issuer.add_console("adobe-client", "1000001", "cred-1")
        port = reserve_port()
        url = f"http://127.0.0.1:{port}"
        adobe = {
            "provider": "adobe",
            "client_id": "adobe-client",
            "ims_url": issuer.url,
            "console_url": issuer.url,
            "console_org_id": "1000001",
            "credential_id": "cred-1",
            "rotate_every": "5s",
            "rotate_verify": "20s",
            "secret": f"file:{secret_file}",
        }
        config = config_file(
            tmp_path / "config.toml",
            {"adobe": adobe},
            server={"listen": [f"127.0.0.1:{port}"]},
            refresh={"force_cooldown": "0s"},
            outputs=[{"credential": "adobe", "path": f"{tmp_path}/adobe.token"}],
        )
        proc = BrokerProcess(config, env={"XDG_STATE_HOME": str(tmp_path / "state")})
        try:
            proc.wait_healthy(url)
            wait_for(lambda: httpx.get(url + "/readyz").status_code == 200, what="a token")
            assert httpx.get(url + "/token", headers=HEADERS).status_code == 200
            assert httpx.get(url + "/token/nope", headers=HEADERS).status_code == 404
            assert httpx.get(url + "/token").status_code == 403  # no header: refused
            issuer.issuer.mode = "error500"
            failed = httpx.post(url + "/v1/credentials/adobe/refresh", headers=HEADERS)
            assert failed.status_code == 502, failed.text
            issuer.issuer.mode = "ok"
            # A cycle that ran while the issuer answered 500 counts a rotation but knows no
            # secret's age yet: wait for both families (a scrape without the age was seen).
            families = ("token_broker_secret_rotations_total{", "token_broker_secret_age_seconds{")
            wait_for(
                lambda: all(f in httpx.get(url + "/metrics").text for f in families),
                timeout=60, what="a secret cycle and the secret's age",
            )  # fmt: skip
            yield Scrape.parse(httpx.get(url + "/metrics").text)
        finally:
            proc.stop()
    finally:
        issuer.stop()
