"""The Kubernetes manifests as the tests see them: each overlay rendered by kustomize.

The tools come from ``deploy/kubernetes/install-tools.sh`` (PyPI packages in their
own virtualenvs, linked into ``$TOKEN_BROKER_K8S_TOOLS/bin``, by default
``/opt/token-broker-k8s-tools/bin``), or else from PATH. Without them a test fails
in CI (``CI=true``) and is skipped elsewhere, with the reason.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kubernetes"
TOOLS = Path(os.environ.get("TOKEN_BROKER_K8S_TOOLS", "/opt/token-broker-k8s-tools")) / "bin"

#: The three modes, and the example workloads that use the node and cluster modes.
OVERLAYS = ("sidecar", "node", "cluster", "node/example-app", "cluster/example-client")
#: The kinds of a workload whose pods run the broker.
WORKLOADS = ("Deployment", "DaemonSet", "StatefulSet", "Pod")


def tool(name: str) -> str:
    """The path of a tool the manifest tests need; fail in CI, skip elsewhere."""
    path = TOOLS / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is not None:
        return found
    reason = f"{name} is not installed (bash deploy/kubernetes/install-tools.sh)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must have {name}: .ci/run runs deploy/kubernetes/install-tools.sh")
    pytest.skip(reason)


@functools.cache
def _render(kubectl: str, overlay: str) -> str:
    done = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / overlay)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"kubectl kustomize {overlay} failed:\n{done.stderr}"
    return done.stdout


def render(overlay: str) -> str:
    """The overlay's objects as kustomize renders them (one YAML stream)."""
    return _render(tool("kubectl"), overlay)


def rendered_by(line: str) -> str:
    """The overlay a documented ``kubectl apply -k DIR`` or ``kubectl kustomize DIR`` line
    names, after checking it renders (``apply`` needs a cluster; what it would apply is
    what ``kustomize`` of the same directory, relative to the repository, renders)."""
    words = shlex.split(line, comments=True)
    assert words[0] == "kubectl" and words[1] in ("apply", "kustomize"), line
    overlay = words[words.index("-k") + 1] if words[1] == "apply" else words[2]
    done = subprocess.run([tool("kubectl"), "kustomize", overlay], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert done.returncode == 0 and "kind: " in done.stdout, done.stderr
    return overlay


def objects(overlay: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(render(overlay)) if doc]


def find(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one object of ``kind`` (and ``name``, if given)."""
    found = [o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]


def broker_containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The containers (init containers included) that run the broker image."""
    spec = pod_spec(obj)
    every = spec.get("initContainers", []) + spec.get("containers", [])
    return [c for c in every if c["image"].split("@")[0].rsplit(":", 1)[0] == "token-broker"]


def broker_config(objs: list[dict[str, Any]]) -> str:
    """config.toml of the broker's ConfigMap (token-broker-<content hash>)."""
    hashed = re.compile(r"token-broker-[a-z0-9]{10}")
    maps = [o for o in objs if o["kind"] == "ConfigMap" and hashed.fullmatch(o["metadata"]["name"])]
    assert len(maps) == 1, [o["metadata"]["name"] for o in maps]
    return maps[0]["data"]["config.toml"]


def probe_command(container: dict[str, Any], probe: str) -> list[str]:
    return list(container[probe]["exec"]["command"])
