"""The README's example alert rules are valid Prometheus rules (checked by promtool)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"


def test_readme_alert_rules_pass_promtool(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must have promtool (Debian package prometheus, see .ci/run)")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    section = README.read_text().split("Two alert rules", 1)[1]
    rules = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "rules.yml"
    path.write_text(rules)
    done = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 2 rules found" in done.stdout
