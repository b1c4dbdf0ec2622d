"""The Kubernetes manifests (deploy/kubernetes): they render, they are valid, they are safe.

No cluster can run here, so each overlay is rendered with ``kubectl kustomize`` and
every object is validated against the schemas of the two newest Kubernetes versions
that kubernetes-validate ships, strictly (an unknown field is an error), and scanned
by checkov; a suppressed finding must carry its reason. On top of the scanner, the
promises of docs/deploy.md, "Running on Kubernetes" are checked object by object: the
hardening of every broker container, the probes that start no `token-broker` process, the update
strategies, the ConfigMap whose name carries its hash, and configs the broker loads.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
from kube import (
    DEPLOY,
    OVERLAYS,
    WORKLOADS,
    broker_config,
    broker_containers,
    find,
    objects,
    pod_spec,
    render,
    tool,
)

from broker import config

KINDS = {
    "sidecar": {"ConfigMap", "Secret", "Deployment"},
    "node": {"Namespace", "ConfigMap", "Secret", "DaemonSet"},
    "cluster": {
        "Namespace", "ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget",
        "NetworkPolicy",
    },
}  # fmt: skip


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_renders(overlay):
    kinds = {o["kind"] for o in objects(overlay)}
    assert kinds >= KINDS.get(overlay, {"Deployment"}), kinds


def _schema_versions() -> list[str]:
    """The two newest Kubernetes versions whose schemas kubernetes-validate ships."""
    script = Path(tool("kubernetes-validate")).resolve()
    python = script.parent / "python"  # the interpreter of the tool's own virtualenv
    code = (
        "import importlib.resources as r, re\n"
        "d = r.files('kubernetes_validate') / 'kubernetes-json-schema'\n"
        "print(*sorted({m[1] for p in d.iterdir() if (m := re.match(r'v(\\d+\\.\\d+\\.\\d+)-', "
        "p.name))}, key=lambda v: tuple(map(int, v.split('.')))))\n"
    )
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    versions = done.stdout.split()
    assert len(versions) >= 2, versions
    return versions[-2:]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_strictly_against_two_kubernetes_versions(overlay, tmp_path):
    validate = tool("kubernetes-validate")
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(render(overlay))
    count = len(objects(overlay))
    for version in _schema_versions():
        done = subprocess.run(
            [validate, "--strict", "-k", version, str(rendered)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        out = done.stdout + done.stderr
        assert done.returncode == 0, out
        # One "passed" line per object: nothing was left out as an unknown kind.
        assert out.count(" passed for resource ") == count, out


def test_checkov_finds_nothing_that_is_not_suppressed_with_a_reason(tmp_path):
    checkov = tool("checkov")
    for overlay in OVERLAYS:
        (tmp_path / (overlay.replace("/", "-") + ".yaml")).write_text(render(overlay))
    done = subprocess.run(
        [checkov, "-d", str(tmp_path), "--config-file", str(DEPLOY / "checkov.yaml"),
         "-o", "json"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    report = json.loads(done.stdout)
    assert report["check_type"] == "kubernetes", report.get("check_type")
    summary = report["summary"]
    failed = [
        f"{c['check_id']} {c['check_name']}: {c['resource']}"
        for c in report["results"]["failed_checks"]
    ]
    assert not failed, "\n".join(failed)
    assert summary["parsing_errors"] == 0 and summary["resource_count"] > 0
    assert summary["passed"] > 100, summary  # the checks ran, over every workload
    assert done.returncode == 0, done.stderr[-2000:]


def test_every_suppressed_finding_says_why():
    # Per object: checkov.io/skipN annotations, "CHECK_ID=reason".
    for overlay in OVERLAYS:
        for obj in objects(overlay):
            for key, value in (obj["metadata"].get("annotations") or {}).items():
                if key.startswith("checkov.io/skip"):
                    check, _, reason = value.partition("=")
                    assert re.fullmatch(r"CKV2?_K8S_\d+", check), (overlay, key, value)
                    assert len(reason.split()) >= 5, f"{overlay} {key}: no reason given"
    # For every object: checkov.yaml's skip-check list, each entry under its own comment.
    lines = (DEPLOY / "checkov.yaml").read_text().splitlines()
    skipped = [i for i, line in enumerate(lines) if re.fullmatch(r"\s+- CKV\w+", line)]
    assert skipped, "checkov.yaml lists no skipped check"
    for i in skipped:
        check = lines[i].split("- ")[1]
        above = lines[i - 1].strip()
        comment = []
        j = i - 1
        while lines[j].strip().startswith("#"):
            comment.insert(0, lines[j])
            j -= 1
        assert above.startswith("#") and any(check in c for c in comment), check
        assert len(" ".join(comment).split()) >= 15, f"{check}: the reason is too short"


def _workloads(overlay: str) -> list[dict[str, Any]]:
    return [o for o in objects(overlay) if o["kind"] in WORKLOADS and broker_containers(o)]


@pytest.mark.parametrize("overlay", ["sidecar", "node", "cluster"])
def test_every_broker_container_is_hardened_and_bounded(overlay):
    (workload,) = _workloads(overlay)
    spec = pod_spec(workload)
    assert spec.get("automountServiceAccountToken") is False
    pod_ctx = spec.get("securityContext", {})
    for c in broker_containers(workload):
        ctx = c.get("securityContext", {})
        assert ctx.get("readOnlyRootFilesystem") is True, c["name"]
        assert ctx.get("allowPrivilegeEscalation") is False, c["name"]
        assert ctx.get("capabilities", {}).get("drop") == ["ALL"], c["name"]
        seccomp = ctx.get("seccompProfile") or pod_ctx.get("seccompProfile")
        assert seccomp == {"type": "RuntimeDefault"}, c["name"]
        assert c["resources"]["limits"]["memory"], c["name"]
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]), c["name"]
        if c["name"] == "socket-dir":
            continue  # node mode's directory step: checked in test_node_socket_directory_*
        assert c["name"] == "token-broker"
        assert ctx.get("runAsNonRoot") is True and ctx.get("runAsUser", 0) != 0
        assert "add" not in ctx["capabilities"]
        assert c["resources"]["limits"]["memory"] == "128Mi"
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert probe in c, f"{overlay}: no {probe}"
            command = c[probe].get("exec", {}).get("command", [])
            # `token-broker health` costs ~0.22 s of CPU and ~40 MB per run (docs/deploy.md,
            # "Running on Kubernetes", Probes).
            assert "token-broker" not in command[:1], f"{overlay} {probe}: a costly probe"


def test_sidecar_is_a_native_sidecar_with_exec_probes_and_a_0400_secret():
    objs = objects("sidecar")
    app = find(objs, "Deployment", "app")
    (broker,) = [c for c in pod_spec(app)["initContainers"] if c["name"] == "token-broker"]
    assert broker["restartPolicy"] == "Always"
    # The kubelet's httpGet/tcpSocket probes go to the pod IP; the broker is on loopback.
    assert all("exec" in broker[p] for p in ("startupProbe", "livenessProbe", "readinessProbe"))
    assert tomllib.loads(broker_config(objs))["server"]["listen"] == ["127.0.0.1:8765"]
    secret = [v for v in pod_spec(app)["volumes"] if "secret" in v]
    assert [v["secret"]["defaultMode"] for v in secret] == [0o400]


def test_node_mode_rolls_one_node_at_a_time_without_surge():
    daemonset = find(objects("node"), "DaemonSet", "token-broker")
    # A surge pod would find the old broker on the socket and refuse to start
    # (tests/integration/test_kubernetes_node.py shows the refusal).
    assert daemonset["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0},
    }


def test_node_config_socket_directory_and_probes_agree():
    objs = objects("node")
    settings = tomllib.loads(broker_config(objs))
    (listen,) = settings["server"]["listen"]
    socket_path = Path(listen.removeprefix("unix:"))
    spec = pod_spec(find(objs, "DaemonSet", "token-broker"))
    (host,) = [v for v in spec["volumes"] if "hostPath" in v]
    assert host["hostPath"] == {"path": str(socket_path.parent), "type": "DirectoryOrCreate"}
    for c in spec["initContainers"] + spec["containers"]:
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert mounts[host["name"]] == str(socket_path.parent), c["name"]
    (init,) = spec["initContainers"]
    assert init["command"][-1] == str(socket_path.parent)
    (broker,) = spec["containers"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert f'"{socket_path}"' in broker[probe]["exec"]["command"][4], probe
    # Every credential names its readers: without allow_uids/allow_gids a credential
    # would be readable by every pod that mounts the directory.
    for name, cred in settings["credentials"].items():
        assert cred.get("allow_uids") or cred.get("allow_gids"), name
    # The example app runs as a uid its credential allows, and mounts the directory.
    app = pod_spec(find(objects("node/example-app"), "Deployment"))
    assert app["securityContext"]["runAsUser"] in settings["credentials"]["adobe"]["allow_uids"]
    (app_host,) = [v for v in app["volumes"] if "hostPath" in v]
    assert app_host["hostPath"]["path"] == str(socket_path.parent)


def test_cluster_mode_spreads_replicas_and_admits_only_labelled_clients():
    objs = objects("cluster")
    deployment = find(objs, "Deployment", "token-broker")
    spec = deployment["spec"]
    assert spec["replicas"] >= 2
    selector = spec["selector"]["matchLabels"]
    anti = pod_spec(deployment)["affinity"]["podAntiAffinity"]
    (term,) = anti["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == selector
    pdb = find(objs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    assert pdb["spec"]["minAvailable"] == 1
    service = find(objs, "Service")
    assert service["spec"]["selector"] == selector
    policy = find(objs, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == selector and policy["policyTypes"] == ["Ingress"]
    clients = policy["ingress"][0]["from"][0]
    assert clients["podSelector"]["matchLabels"] == {"token-broker-client": "true"}
    # The example workload carries that label and its own key Secret, in its own namespace.
    app_objs = objects("cluster/example-client")
    app = find(app_objs, "Deployment")
    assert app["spec"]["template"]["metadata"]["labels"]["token-broker-client"] == "true"
    assert find(app_objs, "Secret")["metadata"]["namespace"] == app["metadata"]["namespace"]
    assert app["metadata"]["namespace"] != deployment["metadata"]["namespace"]


def test_cluster_probes_are_the_kubelets_own_over_tls_on_the_tls_listener():
    objs = objects("cluster")
    (broker,) = pod_spec(find(objs, "Deployment", "token-broker"))["containers"]
    ports = {p["name"]: p["containerPort"] for p in broker["ports"]}
    server = tomllib.loads(broker_config(objs))["server"]
    assert server["allow_remote"] is True  # the kubelet's Host is the pod IP: remote mode
    tls_ports = {int(a.rsplit(":", 1)[1]) for a in server["tls_listen"]}
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"),
                        ("readinessProbe", "/readyz")):  # fmt: skip
        get = broker[probe]["httpGet"]
        assert get["scheme"] == "HTTPS" and get["path"] == path
        assert ports[get["port"]] in tls_ports
    # The certificate and key come from the kubernetes.io/tls Secret's volume.
    mounts = {m["name"]: m["mountPath"] for m in broker["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(find(objs, "Deployment"))["volumes"]}
    tls_volume = next(n for n, v in volumes.items() if v.get("secret", {}).get("secretName") ==
                      "token-broker-tls")  # fmt: skip
    assert server["tls_cert"] == f"{mounts[tls_volume]}/tls.crt"
    assert server["tls_key"] == f"{mounts[tls_volume]}/tls.key"


@pytest.mark.parametrize("overlay", ["sidecar", "node", "cluster"])
def test_the_config_map_name_carries_its_hash_so_a_new_config_rolls_the_pods(overlay, tmp_path):
    import shutil

    (workload,) = _workloads(overlay)
    names = {v["configMap"]["name"] for v in pod_spec(workload)["volumes"] if "configMap" in v}
    (name,) = names & {o["metadata"]["name"] for o in objects(overlay) if o["kind"] == "ConfigMap"}
    assert re.fullmatch(r"token-broker-[a-z0-9]{10}", name), name
    # A changed config.toml renders another name: the pod template changes, pods roll.
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy)
    with open(copy / overlay / "config.toml", "a") as f:
        f.write("\n# changed\n")
    done = subprocess.run([tool("kubectl"), "kustomize", str(copy / overlay)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert name not in done.stdout and "token-broker-" in done.stdout


@pytest.mark.parametrize("overlay", ["sidecar", "node", "cluster"])
def test_the_broker_loads_each_modes_config(overlay, tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(broker_config(objects(overlay)))
    settings = config.load(path)
    assert list(settings.credentials) == ["adobe"]
    assert str(settings.credentials["adobe"].secret) == "file:/run/secrets/token-broker/adobe"
    if overlay == "cluster":  # the main API over TLS, for the Service, with client keys
        assert settings.server.tls_listen and settings.server.allow_remote
        assert settings.server.tls_cert and settings.clients


def test_the_cert_manager_example_names_the_secret_and_the_service():
    import yaml

    cert = yaml.safe_load((DEPLOY / "cluster" / "certificate.example.yaml").read_text())
    objs = objects("cluster")
    service = find(objs, "Service")
    namespace = service["metadata"]["namespace"]
    assert cert["kind"] == "Certificate" and cert["metadata"]["namespace"] == namespace
    assert f"{service['metadata']['name']}.{namespace}.svc" in cert["spec"]["dnsNames"]
    volumes = pod_spec(find(objs, "Deployment"))["volumes"]
    assert cert["spec"]["secretName"] in {v.get("secret", {}).get("secretName") for v in volumes}
    # Not rendered with the overlay: its schema is a custom resource's.
    kustomization = yaml.safe_load((DEPLOY / "cluster" / "kustomization.yaml").read_text())
    assert "certificate.example.yaml" not in kustomization["resources"]
