"""The Kubernetes manifests (deploy/kubernetes): they render, they are valid, they are safe.

No cluster can run here, so each overlay is rendered with ``kubectl kustomize`` and
every object is validated against the schemas of the two newest Kubernetes versions
that kubernetes-validate ships, strictly (an unknown field is an error), and scanned
by checkov; a suppressed finding must carry its reason. On top of the scanner, the
promises of docs/deploy.md, "Running on Kubernetes" are checked object by object: the
hardening of every broker container, the probes that start no `token-broker` process, the update
strategies, the ConfigMap whose name carries its hash, and configs the broker loads.
The Vault variants (vault-sidecar, vault-cluster, with the component vault/) are checked
the same way, and for what their mode promises on top: no Secret holds the client
secret, the projected token is Vault's and sits where the config reads it, the example
role binds the pod's ServiceAccount, and the example policy matches the config's secret
and lets a cycling broker make its calls in a real OpenBao.
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
    rendered_by,
    tool,
)

from broker import config

#: The sidecar and cluster modes with the client secret in Vault (component ../vault).
VAULT_OVERLAYS = ("vault-sidecar", "vault-cluster")
ALL_OVERLAYS = OVERLAYS + VAULT_OVERLAYS
#: The Vault side, shared by both: the policy and the example setup.
VAULT = DEPLOY / "vault"

KINDS = {
    "sidecar": {"ConfigMap", "Secret", "Deployment"},
    "node": {"Namespace", "ConfigMap", "Secret", "DaemonSet"},
    "cluster": {
        "Namespace", "ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget",
        "NetworkPolicy",
    },
    "vault-sidecar": {"ServiceAccount", "ConfigMap", "Deployment"},
    "vault-cluster": {
        "Namespace", "ServiceAccount", "ConfigMap", "Deployment", "Service",
        "PodDisruptionBudget", "NetworkPolicy",
    },
}  # fmt: skip


@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
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


@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
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
    for overlay in ALL_OVERLAYS:
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
    for overlay in ALL_OVERLAYS:
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


MODES = ("sidecar", "node", "cluster", *VAULT_OVERLAYS)


@pytest.mark.parametrize("overlay", MODES)
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


def _rerendered_with(tmp_path: Path, overlay: str, changed: str) -> str:
    """The overlay rendered from a copy of deploy/kubernetes where ``changed`` (a path
    under it) has one more line."""
    import shutil

    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy)
    with open(copy / changed, "a") as f:
        f.write("\n# changed\n")
    done = subprocess.run([tool("kubectl"), "kustomize", str(copy / overlay)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("overlay", MODES)
def test_the_config_map_name_carries_its_hash_so_a_new_config_rolls_the_pods(overlay, tmp_path):
    (workload,) = _workloads(overlay)
    names = {v["configMap"]["name"] for v in pod_spec(workload)["volumes"] if "configMap" in v}
    config_map = re.compile(r"token-broker-[a-z0-9]{10}")
    rendered = {o["metadata"]["name"] for o in objects(overlay) if o["kind"] == "ConfigMap"}
    (name,) = {n for n in names & rendered if config_map.fullmatch(n)}
    # A changed config.toml renders another name: the pod template changes, pods roll.
    after = _rerendered_with(tmp_path, overlay, f"{overlay}/config.toml")
    assert name not in after and "token-broker-" in after


#: The secret each mode's config names: a mounted file, or Vault's KV v2 field.
SECRETS = dict.fromkeys(("sidecar", "node", "cluster"), "file:/run/secrets/token-broker/adobe")
SECRETS |= dict.fromkeys(VAULT_OVERLAYS, "vault:secret/token-broker/adobe#client_secret")


@pytest.mark.parametrize("overlay", MODES)
def test_the_broker_loads_each_modes_config(overlay, tmp_path):
    # As `serve` loads it: with rotate_every, the daemon checks that it may write the
    # secret (a mounted Secret: no; Vault: yes). The Vault overlays' [vault] table needs
    # the broker's Vault support.
    path = tmp_path / "config.toml"
    text = broker_config(objects(overlay))
    if overlay in VAULT_OVERLAYS:  # the CA the pod mounts from its ConfigMap: one of ours here
        from helpers import make_ca_and_leaf

        ca = make_ca_and_leaf(tmp_path, "vault")[0]
        text = text.replace("/etc/token-broker-vault/ca.crt", str(ca))
        assert str(ca) in text
    path.write_text(text)
    settings = config.load(path, serving=True)
    assert list(settings.credentials) == ["adobe"]
    adobe = settings.credentials["adobe"]
    assert str(adobe.secret) == SECRETS[overlay]
    assert adobe.cycles_secret is (overlay in VAULT_OVERLAYS)  # only Vault lets a fleet cycle
    if overlay.endswith("cluster"):  # the main API over TLS, for the Service, with client keys
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


# -- the Vault variants (vault-sidecar, vault-cluster) -----------------------------------------


def _vault_parts(overlay: str) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """The rendered objects, the broker's workload and its container."""
    objs = objects(overlay)
    (workload,) = [o for o in objs if o["kind"] in WORKLOADS and broker_containers(o)]
    (broker,) = broker_containers(workload)
    return objs, workload, broker


def _projected_tokens(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(volume name, serviceAccountToken source) of each projected token of a pod."""
    return [
        (v["name"], source["serviceAccountToken"])
        for v in spec["volumes"]
        for source in v.get("projected", {}).get("sources", [])
        if "serviceAccountToken" in source
    ]


def _secret_ref(settings: dict[str, Any]) -> tuple[str, str, str]:
    """(mount, path, field) of the adobe credential's ``vault:MOUNT/PATH#FIELD``."""
    ref = settings["credentials"]["adobe"]["secret"]
    m = re.fullmatch(r"vault:([^/#]+)/([^#]+)#(\w+)", ref)
    assert m, f"not a vault:MOUNT/PATH#FIELD reference: {ref}"
    return m[1], m[2], m[3]


@pytest.mark.parametrize("overlay", VAULT_OVERLAYS)
def test_no_kubernetes_secret_holds_or_names_the_client_secret(overlay):
    objs, workload, _ = _vault_parts(overlay)
    assert [o["metadata"]["name"] for o in objs if o["kind"] == "Secret"] == []
    assert "token-broker-credentials" not in render(overlay)
    spec = pod_spec(workload)
    # The one Secret a pod may still mount is the cluster mode's TLS certificate and key.
    secret_volumes = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"]
                      if "secret" in v}  # fmt: skip
    for v in spec["volumes"]:
        assert all("secret" not in s for s in v.get("projected", {}).get("sources", [])), v
    assert set(secret_volumes.values()) == ({"token-broker-tls"} if "cluster" in overlay else set())
    settings = tomllib.loads(broker_config(objs))
    if secret_volumes:
        (tls_volume,) = secret_volumes
        for c in spec.get("initContainers", []) + spec["containers"]:
            mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
            if tls_volume in mounts:
                assert settings["server"]["tls_key"].startswith(mounts[tls_volume] + "/")
    for c in spec.get("initContainers", []) + spec["containers"]:
        assert "envFrom" not in c, c["name"]
        assert all("valueFrom" not in e for e in c.get("env", [])), c["name"]
        mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
        assert "/run/secrets/token-broker" not in mounts, c["name"]
    # The config reads every secret from Vault: no file:, env: or keyring secret left.
    for name, cred in settings["credentials"].items():
        assert cred["secret"].startswith("vault:"), name


@pytest.mark.parametrize("overlay", VAULT_OVERLAYS)
def test_the_projected_token_is_vaults_short_lived_and_where_the_config_reads_it(overlay):
    objs, workload, broker = _vault_parts(overlay)
    spec = pod_spec(workload)
    # No API token anywhere in the pod: the projected one is the pod's only token.
    assert spec["automountServiceAccountToken"] is False
    ((volume, token),) = _projected_tokens(spec)
    assert token["audience"] == "vault"  # the API server refuses it; Vault's role asks for it
    # Short-lived: 600 s is the shortest the API server issues; the kubelet renews it.
    assert 600 <= token["expirationSeconds"] <= 3600, token
    mounts = {m["name"]: m for m in broker["volumeMounts"]}
    assert mounts[volume]["readOnly"] is True
    assert mounts[volume]["mountPath"] == "/var/run/secrets/tokens"
    vault = tomllib.loads(broker_config(objs))["vault"]
    assert vault["jwt"] == f"file:{mounts[volume]['mountPath']}/{token['path']}"
    # Only the broker's container mounts it (in sidecar mode the app shares the pod).
    others = [c for c in spec.get("initContainers", []) + spec["containers"] if c is not broker]
    for c in others:
        assert volume not in {m["name"] for m in c.get("volumeMounts", [])}, c["name"]
    # Vault's CA: a ConfigMap (a certificate is no secret) mounted where ca_file points.
    ca_dir, ca_key = vault["ca_file"].rsplit("/", 1)
    (ca_volume,) = [n for n, m in mounts.items() if m["mountPath"] == ca_dir]
    (ca_map,) = [v["configMap"]["name"] for v in spec["volumes"] if v["name"] == ca_volume]
    assert ca_key in find(objs, "ConfigMap", ca_map)["data"]
    assert mounts[ca_volume]["readOnly"] is True


@pytest.mark.parametrize("overlay", VAULT_OVERLAYS)
def test_a_new_vault_ca_rolls_the_pods(overlay, tmp_path):
    _, workload, _ = _vault_parts(overlay)
    maps = [v["configMap"]["name"] for v in pod_spec(workload)["volumes"] if "configMap" in v]
    (name,) = [n for n in maps if n.startswith("token-broker-vault-ca-")]
    assert re.fullmatch(r"token-broker-vault-ca-[a-z0-9]{10}", name), name
    after = _rerendered_with(tmp_path, overlay, "vault/ca.crt")
    assert name not in after and "token-broker-vault-ca-" in after


@pytest.mark.parametrize("overlay", VAULT_OVERLAYS)
def test_the_config_logs_in_to_vault_as_the_pod_and_cycles_the_secret(overlay):
    text = broker_config(objects(overlay))
    settings = tomllib.loads(text)
    vault = settings["vault"]
    assert vault["address"].startswith("https://")  # http only on loopback
    assert vault["auth"] == "kubernetes" and vault["role"]
    assert vault["jwt"].startswith("file:")  # read at every login: the kubelet rewrites it
    assert vault["poll"]
    # The other login a pod can use with the same token, shown to the reader.
    assert re.search(r'^#.*\bauth = "jwt"', text, re.M), "the jwt alternative is not shown"
    adobe = settings["credentials"]["adobe"]
    mount, path, field = _secret_ref(settings)
    assert (mount, path, field) == ("secret", "token-broker/adobe", "client_secret")
    # Cycling on: the period, and the Developer Console ids a cycle needs.
    assert adobe["rotate_every"] and adobe["credential_id"] and adobe["console_org_id"]
    # Nothing else to keep: no writable volume (the cycle's state lives in Vault).
    spec = pod_spec(_vault_parts(overlay)[1])
    assert not [v for v in spec["volumes"] if "emptyDir" in v or "persistentVolumeClaim" in v]


def _setup_script() -> dict[str, str]:
    """The variables of vault-setup.example.sh (``${X:-default}``: the default)."""
    found = {}
    for name, value in re.findall(r"^([A-Z_]+)=(\S+)", (VAULT / "vault-setup.example.sh")
                                  .read_text(), re.M):  # fmt: skip
        m = re.fullmatch(r"\$\{\w+:-(.*)\}", value)
        found[name] = m[1] if m else value
    return found


@pytest.mark.parametrize("overlay", VAULT_OVERLAYS)
def test_the_example_role_binds_the_service_account_the_pod_runs_as(overlay):
    objs, workload, _ = _vault_parts(overlay)
    spec = pod_spec(workload)
    account = find(objs, "ServiceAccount", spec["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False
    assert account["metadata"].get("namespace") == workload["metadata"].get("namespace")
    settings = tomllib.loads(broker_config(objs))
    ((_, token),) = _projected_tokens(spec)
    script = (VAULT / "vault-setup.example.sh").read_text()
    names = _setup_script()
    assert names["SERVICE_ACCOUNT"] == spec["serviceAccountName"]
    assert names["AUDIENCE"] == token["audience"]
    assert names["ROLE"] == settings["vault"]["role"]
    namespace = workload["metadata"].get("namespace")
    if namespace is not None:  # cluster mode; the sidecar's is the app's, chosen at apply
        assert namespace in names["NAMESPACES"].split(","), names["NAMESPACES"]
    # Both logins bind exactly these: the kubernetes role and the jwt role.
    for bound in (
        'bound_service_account_names="$SERVICE_ACCOUNT"',
        'bound_service_account_namespaces="$NAMESPACES"',
        'audience="$AUDIENCE"',
        'token_policies="$POLICY"',
        "auth/kubernetes/role/$ROLE",
        '"bound_audiences": ["$AUDIENCE"]',
        "system:serviceaccount:%s:'\"$SERVICE_ACCOUNT",
        '"token_policies": ["$POLICY"]',
        "auth/jwt/role/$ROLE",
        'policy write "$POLICY" "$HERE/vault-policy.hcl"',
    ):
        assert bound in script, bound
    assert "token_no_default_policy=true" not in script  # renew-self needs `default`
    # The first secret goes where the config reads it, from stdin, only if absent.
    mount, path, field = _secret_ref(settings)
    assert names["SECRET"] == f"{mount}/{path}"
    assert f'kv put -cas=0 "$SECRET" {field}=-' in script


def _policy() -> dict[str, set[str]]:
    """vault-policy.hcl: each path and its capabilities (a path written twice: merged)."""
    text = "\n".join(line for line in (VAULT / "vault-policy.hcl").read_text().splitlines()
                     if not line.lstrip().startswith("#"))  # fmt: skip
    rules: dict[str, set[str]] = {}
    for path, caps in re.findall(r'path\s+"([^"]+)"\s*\{\s*capabilities\s*=\s*\[([^\]]*)\]\s*\}',
                                 text):  # fmt: skip
        rules.setdefault(path, set()).update(re.findall(r'"(\w+)"', caps))
    assert rules, "vault-policy.hcl holds no path rule"
    return rules


def _cycling_policy(mount: str, path: str) -> dict[str, set[str]]:
    """The least a cycling broker needs for the KV v2 secret MOUNT/PATH (OpenBao 2.7.2)."""
    data, meta = f"{mount}/data/{path}", f"{mount}/metadata/{path}"
    return {
        data: {"read", "create", "update"},
        meta: {"read"},
        f"{data}/cycle": {"read", "create", "update"},
        f"{data}/brokers/*": {"read", "create", "update"},
        f"{meta}/brokers/": {"list"},
        f"{meta}/brokers/*": {"delete"},
    }


@pytest.mark.parametrize("overlay", VAULT_OVERLAYS)
def test_the_example_policy_is_the_least_for_the_configs_secret(overlay):
    mount, path, _ = _secret_ref(tomllib.loads(broker_config(objects(overlay))))
    assert _policy() == _cycling_policy(mount, path)


def test_the_example_policy_lets_a_cycling_broker_make_its_calls_in_openbao(openbao):
    """The policy file as OpenBao reads it: a token with it (and `default`) makes every
    call of a cycling broker on the config's secret, and no other."""
    mount, path, field = _secret_ref(tomllib.loads(broker_config(objects("vault-cluster"))))
    openbao.put_policy("token-broker", (VAULT / "vault-policy.hcl").read_text())
    token = openbao.create_token(["token-broker"])
    version = openbao.kv_write(mount, path, {field: "first"}, cas=0)  # the setup's -cas=0

    def status(method: str, where: str, body: Any = None) -> int:
        return openbao.request(method, where, token=token, json=body).status_code

    data, meta = f"{mount}/data/{path}", f"{mount}/metadata/{path}"
    write = {"options": {"cas": 0}, "data": {"x": "1"}}
    assert status("GET", data) == 200 and status("GET", meta) == 200  # read, poll the version
    assert status("POST", f"{data}/brokers/b1", {"data": {"version": 1}}) == 200  # report
    assert status("POST", f"{data}/cycle", write) == 200  # the lease, check-and-set
    assert status("GET", f"{data}/cycle") == 200
    staged = {"options": {"cas": version}, "data": {field: "first", f"{field}_pending": "2"}}
    assert status("POST", data, staged) == 200  # a new version of the secret
    assert status("LIST", f"{meta}/brokers/") == 200  # every broker's report
    assert status("GET", f"{data}/brokers/b1") == 200
    assert status("DELETE", f"{meta}/brokers/b1") == 204  # a stale report, every version
    assert status("DELETE", f"{data}/brokers/b2") == 403  # (the broker never needs this)
    assert status("POST", "auth/token/renew-self", {}) == 200  # the `default` policy
    # Nothing beyond: another secret, the secret's history, a write without the lease.
    assert status("GET", f"{mount}/data/token-broker/other") == 403
    assert status("DELETE", meta) == 403
    assert status("POST", f"{mount}/destroy/{path}", {"versions": [1]}) == 403
    assert status("GET", f"{data}/elsewhere") == 403


def test_the_cluster_modes_egress_if_restricted_lets_the_brokers_reach_vault():
    objs = objects("vault-cluster")
    policy = find(objs, "NetworkPolicy")["spec"]
    port = int(tomllib.loads(broker_config(objs))["vault"]["address"].rsplit(":", 1)[1])
    if "Egress" in policy["policyTypes"]:
        allowed = {
            p.get("port") for rule in policy.get("egress", []) for p in rule.get("ports", [])
        }
        assert port in allowed, f"egress is restricted and does not admit Vault's port {port}"
    # And clients reach the brokers exactly as in the cluster mode.
    assert policy == find(objects("cluster"), "NetworkPolicy")["spec"]


def test_the_vault_kubernetes_commands_render():
    """docs/deploy.md's commands for the Vault overlays: what `kubectl apply -k` would
    apply renders (the tests above check every object)."""
    from doctext import block, commands

    applied = [Path(rendered_by(line)).name for line in commands(block("kubectl-vault"))]
    assert set(VAULT_OVERLAYS) <= set(applied)
