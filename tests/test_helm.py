"""The Helm chart, rendered by a real helm and checked against the Kubernetes schemas."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from .helpers import free_port, wait_for

ROOT = Path(__file__).parent.parent
CHART = ROOT / "helm" / "bilayer"
HELM = Path(sys.executable).with_name("helm")
KUBERNETES = "1.33"
BUILT_IN = {
    "apps/v1",
    "v1",
    "policy/v1",
    "networking.k8s.io/v1",
    "rbac.authorization.k8s.io/v1",
    "autoscaling/v2",
}

NON_DEFAULT = [
    "--set",
    "operator.watchNamespaces={shop,payments}",
    "--set",
    "service.type=NodePort",
    "--set",
    "service.externalTrafficPolicy=Local",
    "--set",
    "metrics.serviceMonitor.enabled=true",
    "--set",
    "dataplane.accessLog=false",
    "--set",
    "dataplane.routeMetrics=false",
    "--set",
    "dataplane.adminPort=19901",
    "--set",
    "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.team=monitoring",
    "--set",
    "dataplane.tracing.otlpEndpoint=http://otel-collector.observability:4318",
    "--set",
    "dataplane.tracing.sampling=0.5",
    "--set",
    "dataplane.tracing.env[0].name=OTEL_SERVICE_NAME",
    "--set",
    "dataplane.tracing.env[0].value=edge",
]


# The chart has no default image (there is no public one): every render names one,
# unless a test sets image.repository itself.
IMAGE = ["--set", "image.repository=registry.example/bilayer"]


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    if not HELM.exists():
        pytest.fail("helm is not installed: `make install` runs scripts/fetch-helm", pytrace=False)
    if args[0] in ("template", "lint") and not any("image.repository" in a for a in args):
        args = (*args, *IMAGE)
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, check=False, timeout=60)


def render(*values: str) -> list[dict[str, Any]]:
    result = helm("template", "bilayer", str(CHART), "--namespace", "ingress", *values)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def containers(objects: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [
        (obj, container)
        for obj in objects
        if obj["kind"] in ("Deployment", "DaemonSet")
        for container in obj["spec"]["template"]["spec"]["containers"]
    ]


def test_helm_lint() -> None:
    result = helm("lint", str(CHART))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", [[], NON_DEFAULT], ids=["defaults", "non-defaults"])
def test_every_object_is_valid_kubernetes(values: list[str]) -> None:
    objects = render(*values)
    kinds = {obj["kind"] for obj in objects}
    assert {
        "Deployment",
        "Service",
        "Secret",
        "ServiceAccount",
        "NetworkPolicy",
        "PodDisruptionBudget",
    } <= kinds
    for obj in objects:
        if obj["apiVersion"] in BUILT_IN:
            kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    for crd in (CHART / "crds").glob("*.yaml"):
        kubernetes_validate.validate(yaml.safe_load(crd.read_text()), KUBERNETES, strict=True)


@pytest.mark.parametrize("values", [[], NON_DEFAULT], ids=["defaults", "non-defaults"])
def test_pods_are_locked_down(values: list[str]) -> None:
    for deployment, container in containers(render(*values)):
        pod = deployment["spec"]["template"]["spec"]
        security = container["securityContext"]
        assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["securityContext"]["runAsNonRoot"]
        assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
        if container["name"] == "dataplane":
            assert {"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"} in pod["securityContext"][
                "sysctls"
            ]
            assert pod["automountServiceAccountToken"] is False
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
            assert container["lifecycle"]["preStop"]
            assert pod["terminationGracePeriodSeconds"] >= 35
        if container["name"] == "operator":
            port = container["ports"][0]["containerPort"]
            assert f"--health-port={port}" in container["args"]
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
            startup = container["startupProbe"]
            assert startup["httpGet"]["path"] == "/readyz"
            assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


def test_rbac_is_least_privilege() -> None:
    for values in ([], NON_DEFAULT):
        for obj in render(*values):
            if obj["kind"] not in ("Role", "ClusterRole"):
                continue
            for rule in obj["rules"]:
                for field in ("apiGroups", "resources", "verbs"):
                    assert "*" not in rule[field], (obj["metadata"]["name"], rule)
                writes = set(rule["verbs"]) - {"get", "list", "watch"}
                if writes == {"patch"} and not rule.get("resourceNames"):
                    assert all(r.endswith("/status") for r in rule["resources"]), rule
                if writes and not all(r.endswith("/status") for r in rule["resources"]):
                    # Writes outside status: only the dataplane Service and the Lease, by name.
                    assert rule.get("resourceNames") or rule["verbs"] == ["create"], rule
                assert not {"delete", "update", "deletecollection", "escalate", "bind"} & set(rule["verbs"])
                # The operator reads through list and watch; it GETs only the dataplane
                # Service and its Lease, by name (the envtest tests run under these rules).
                if "get" in rule["verbs"]:
                    assert rule.get("resourceNames"), (obj["metadata"]["name"], rule)
    scoped = render(*NON_DEFAULT)
    assert not [o for o in scoped if o["kind"] == "ClusterRole"]  # watchNamespaces: Roles only
    assert {o["metadata"]["namespace"] for o in scoped if o["kind"] == "Role"} >= {"shop", "payments"}


def _granted(objects: list[dict[str, Any]], namespace: str) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) the operator's ServiceAccount may use in namespace,
    from the Roles its RoleBindings there name (and every ClusterRole bound to it)."""
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in objects}
    granted = set()
    for binding in objects:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if binding["kind"] == "RoleBinding" and binding["metadata"]["namespace"] != namespace:
            continue
        ref = binding["roleRef"]
        role = roles[(ref["kind"], namespace if ref["kind"] == "Role" else None, ref["name"])]
        for rule in role["rules"]:
            granted |= {
                (g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
            }
    return granted


def test_watching_the_release_namespace_keeps_every_permission() -> None:
    """operator.watchNamespaces holding the release namespace rendered two Roles named
    bilayer-operator there; the one that survived could not read routes (403, and the
    operator crash-looped on a single-namespace install)."""
    objects = render("--set", "operator.watchNamespaces={ingress,shop}")
    keys = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)
    granted = _granted(objects, "ingress")
    for needed in [
        ("bilayer.dev", "l7routes", "watch"),
        ("bilayer.dev", "l4listeners/status", "patch"),
        ("", "services", "list"),
        ("discovery.k8s.io", "endpointslices", "watch"),
        ("", "configmaps", "watch"),  # CA bundles for TLS to backends
        ("", "pods", "watch"),
        ("", "services", "patch"),
        ("coordination.k8s.io", "leases", "patch"),
    ]:
        assert needed in granted, needed
    assert ("bilayer.dev", "l7routes", "watch") in _granted(objects, "shop")


def test_network_policy_guards_the_admin_and_metrics_ports() -> None:
    policy = next(o for o in render(*NON_DEFAULT) if o["kind"] == "NetworkPolicy")
    admin_rule, metrics_rule, listeners_rule = policy["spec"]["ingress"]
    assert admin_rule["ports"] == [{"protocol": "TCP", "port": 19901}]
    assert [p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in admin_rule["from"]] == [
        "operator"
    ]
    # Scrapers (and the chart's `helm test` pod) reach the read-only port only, never the
    # one that takes tables.
    assert metrics_rule["ports"] == [{"protocol": "TCP", "port": 9903}]
    test_pod, scrapers = metrics_rule["from"]
    assert test_pod["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "test"
    assert scrapers == {"namespaceSelector": {"matchLabels": {"team": "monitoring"}}}
    assert listeners_rule["ports"] == [
        {"protocol": "TCP", "port": 1, "endPort": 9902},
        {"protocol": "TCP", "port": 9904, "endPort": 19900},
        {"protocol": "TCP", "port": 19902, "endPort": 65535},
        {"protocol": "UDP", "port": 1, "endPort": 65535},  # UDP listeners (issue 15)
    ]
    assert "from" not in listeners_rule


def test_probes_and_scrapes_use_the_read_only_port() -> None:
    objects = render(*NON_DEFAULT)
    _, container = next((d, c) for d, c in containers(objects) if c["name"] == "dataplane")
    assert {"name": "metrics", "containerPort": 9903} in container["ports"]
    assert "--metrics-port=9903" in container["args"]
    assert container["readinessProbe"]["httpGet"]["port"] == "metrics"
    assert container["livenessProbe"]["httpGet"]["port"] == "metrics"
    monitor = next(
        o for o in objects if o["kind"] == "ServiceMonitor" and o["metadata"]["name"].endswith("-dataplane")
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and "bearerTokenSecret" not in endpoint
    service = next(o for o in objects if o["metadata"]["name"] == "bilayer-metrics")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9903, "targetPort": "metrics"}]
    clash = helm("template", "bilayer", str(CHART), "--set", "dataplane.metricsPort=9901")
    assert clash.returncode != 0 and "must differ" in clash.stderr


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["--set", "service.type=Ingress"], "/service/type"),
        (["--set", "dataplane.replicas=0"], "/dataplane/replicas"),
        (["--set", "dataplane.adminPort=70000"], "/dataplane/adminPort"),
        (["--set", "operator.watchNamespaces={Bad_Name}"], "/operator/watchNamespaces/0"),
        (["--set", "surprise=true"], "surprise"),
        (["--set", "dataplane.tracing.sampling=2"], "/dataplane/tracing/sampling"),
        (["--set", "dataplane.tracing.otlpEndpoint=collector:4318"], "/dataplane/tracing/otlpEndpoint"),
        (["--set", "image.registry=docker.io"], "registry"),  # a typo: global.imageRegistry
        (["--set", "image.digest=latest"], "/image/digest"),
        (["--set-string", "dataplane.routeMetrics=no"], "/dataplane/routeMetrics"),
        (["--set", "imagePullSecrets[0].nam=regcred"], "nam"),
        (["--set", "className=Internal_Ingress"], "/className"),
        (["--set", "dataplane.workers=0"], "/dataplane/workers"),
        (["--set", "dataplane.workers=many"], "/dataplane/workers"),
    ],
)
def test_schema_rejects_bad_values(values: list[str], message: str) -> None:
    result = helm("template", "bilayer", str(CHART), *values)
    assert result.returncode != 0
    assert message in result.stderr


def test_tracing_values_reach_the_dataplane() -> None:
    _, plain = next((d, c) for d, c in containers(render()) if c["name"] == "dataplane")
    assert not [a for a in _args(plain) if a.startswith(("--otlp", "--trace"))]
    assert [e["name"] for e in plain["env"]] == ["BILAYER_ADMIN_TOKEN"]
    _, traced = next((d, c) for d, c in containers(render(*NON_DEFAULT)) if c["name"] == "dataplane")
    args = _args(traced)
    assert "--otlp-endpoint=http://otel-collector.observability:4318" in args
    assert "--trace-sampling=0.5" in args
    env = {e["name"]: e for e in traced["env"]}
    assert (
        env["OTEL_RESOURCE_ATTRIBUTES"]["value"]
        == "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE)"
    )
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["OTEL_SERVICE_NAME"]["value"] == "edge"


def test_the_route_metrics_switch_reaches_the_dataplane() -> None:
    from controlplane.cli import parser

    for values, expected in (([], True), (NON_DEFAULT, False)):
        _, container = next((d, c) for d, c in containers(render(*values)) if c["name"] == "dataplane")
        assert ("--no-route-metrics" in _args(container)) is not expected
        assert parser().parse_args(_args(container)).route_metrics is expected


def test_the_worker_count_reaches_the_dataplane() -> None:
    from controlplane.cli import parser
    from dataplane.workers import usable_cpus

    for values, expected in (([], usable_cpus()), (["--set", "dataplane.workers=3"], 3)):
        rendered = render(*values)
        _, container = next((d, c) for d, c in containers(rendered) if c["name"] == "dataplane")
        assert parser().parse_args(_args(container)).workers == expected
    _, default = next((d, c) for d, c in containers(render()) if c["name"] == "dataplane")
    assert "--workers=auto" in _args(default)
    assert default["resources"]["limits"]["cpu"] == "2"  # what auto counts in a pod


def test_chart_crds_are_the_generated_ones() -> None:
    for path in (ROOT / "crds").glob("*.yaml"):
        assert (CHART / "crds" / path.name).read_text() == path.read_text()


def _args(container: dict[str, Any]) -> list[str]:
    return [str(a) for a in container["args"]]


def test_the_dataplane_entry_point_starts_as_the_chart_runs_it(tmp_path: Path) -> None:
    _, container = next((d, c) for d, c in containers(render()) if c["name"] == "dataplane")
    port, metrics = free_port(), free_port()
    args = [
        a
        for a in _args(container)
        if not a.startswith(("--state-dir", "--admin-port", "--metrics-port", "--address", "--admin-address"))
    ]
    args += [
        f"--state-dir={tmp_path}",
        f"--admin-port={port}",
        f"--metrics-port={metrics}",
        "--address=127.0.0.1",
        "--admin-address=127.0.0.1",
    ]
    bilayer = Path(sys.executable).with_name("bilayer")
    process = subprocess.Popen(
        [str(bilayer), *args],
        env={**os.environ, "BILAYER_ADMIN_TOKEN": "t"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _status(f"http://127.0.0.1:{metrics}/healthz") == 200, what="/healthz")
        assert _status(f"http://127.0.0.1:{metrics}/readyz") == 503  # no table yet
        assert _status(f"http://127.0.0.1:{metrics}/metrics") == 200  # no token needed there
        assert _status(f"http://127.0.0.1:{port}/metrics") == 401  # but on the admin port
    finally:
        process.terminate()
        assert process.wait(30) == 0


async def test_the_operator_entry_point_starts_as_the_chart_runs_it(tmp_path: Path) -> None:
    import asyncio

    from .operator_kit import running_cluster, write_kubeconfig

    _, container = next((d, c) for d, c in containers(render()) if c["name"] == "operator")
    health = free_port()
    args = [a if not a.startswith("--health-port") else f"--health-port={health}" for a in _args(container)]
    args.append("--health-address=127.0.0.1")
    async with running_cluster() as cluster:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", cluster.url)
        bilayer = Path(sys.executable).with_name("bilayer")
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "BILAYER_ADMIN_TOKEN": "t",
            "POD_NAME": "operator-0",
        }
        process = await asyncio.create_subprocess_exec(
            str(bilayer), *args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:

            async def alive() -> bool:
                return await asyncio.to_thread(_status, f"http://127.0.0.1:{health}/healthz") == 200

            from .helpers import async_wait_for

            await async_wait_for(alive, deadline_s=30, what="the operator's liveness endpoint")

            async def leading() -> bool:
                lease = await cluster.api.get(
                    "/apis/coordination.k8s.io/v1/namespaces/ingress/leases/bilayer-operator"
                )
                return lease is not None and lease["spec"]["holderIdentity"] == "operator-0"

            await async_wait_for(leading, deadline_s=30, what="the operator to take the Lease")
        finally:
            process.terminate()
            await asyncio.wait_for(process.wait(), 30)


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except OSError:
        return 0


@pytest.mark.parametrize("values", [[], NON_DEFAULT], ids=["defaults", "non-defaults"])
def test_two_renders_are_identical(values: list[str]) -> None:
    """GitOps: a render that changes on every sync is a diff that never settles."""
    first, second = (
        helm("template", "bilayer", str(CHART), "--namespace", "ingress", *values) for _ in range(2)
    )
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout


def test_no_template_depends_on_the_cluster_or_on_chance() -> None:
    """`helm template` (and so Argo CD and Flux) renders lookup as nothing: a template that
    uses it renders differently from `helm install`."""
    for template in (t for t in (CHART / "templates").rglob("*") if t.is_file()):
        text = template.read_text()
        for call in ("lookup ", "randAlphaNum", "randAscii", "uuidv4", "now ", "genCA", "genPrivateKey"):
            assert call not in text, (template.name, call)


def test_the_admin_token_comes_from_an_existing_secret_or_the_operator() -> None:
    generated = render()
    (secret,) = [o for o in generated if o["kind"] == "Secret"]
    assert "data" not in secret and "stringData" not in secret
    _, operator = next((d, c) for d, c in containers(generated) if c["name"] == "operator")
    assert f"--admin-token-secret={secret['metadata']['name']}" in operator["args"]
    (env,) = [e for e in operator["env"] if e["name"] == "BILAYER_ADMIN_TOKEN"]
    assert env["valueFrom"]["secretKeyRef"]["optional"] is True  # it starts before the token exists
    role = next(o for o in generated if o["kind"] == "Role" and o["metadata"]["namespace"] == "ingress")
    (rule,) = [r for r in role["rules"] if r["resources"] == ["secrets"]]
    assert rule["resourceNames"] == [secret["metadata"]["name"]] and rule["verbs"] == ["get", "patch"]

    own = render("--set", "adminToken.existingSecret=platform-token")
    assert not [o for o in own if o["kind"] == "Secret"]
    for _, container in containers(own):
        (env,) = [e for e in container["env"] if e["name"] == "BILAYER_ADMIN_TOKEN"]
        assert env["valueFrom"]["secretKeyRef"] == {"name": "platform-token", "key": "token"}
        assert not [a for a in container["args"] if a.startswith("--admin-token-secret")]
    for role in (o for o in own if o["kind"] in ("Role", "ClusterRole")):
        assert all("platform-token" not in r.get("resourceNames", []) for r in role["rules"])
        assert all(r["resources"] != ["secrets"] or "patch" not in r["verbs"] for r in role["rules"])


DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("values", "image"),
    [
        ([], "registry.example/bilayer:0.1.0"),
        (["--set", "image.tag=1.2.3"], "registry.example/bilayer:1.2.3"),
        (
            ["--set", f"image.digest={DIGEST}", "--set", "image.tag=1.2.3"],
            f"registry.example/bilayer@{DIGEST}",
        ),
        (
            ["--set", "global.imageRegistry=mirror.internal:5000/"],
            "mirror.internal:5000/registry.example/bilayer:0.1.0",
        ),
    ],
)
def test_image_digest_registry_and_pull_secrets(values: list[str], image: str) -> None:
    objects = render(*values, "--set", "imagePullSecrets[0].name=regcred")
    for deployment, container in containers(objects):
        assert container["image"] == image
        assert deployment["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]


def test_an_umbrella_charts_other_globals_pass() -> None:
    render("--set", "global.storageClass=fast")


@pytest.mark.parametrize("repository", ["", "null"], ids=["empty", "unset"])
def test_no_image_repository_fails_the_render_saying_what_to_do(repository: str) -> None:
    result = helm("template", "bilayer", str(CHART), "--set", f"image.repository={repository}")
    assert result.returncode != 0
    assert "image.repository is not set" in result.stderr and "docker push" in result.stderr


PLACEMENT = [
    *("--set", "service.loadBalancerClass=example.com/lb"),
    *("--set", "service.loadBalancerSourceRanges={10.0.0.0/8}"),
    *("--set", "service.annotations.team=edge"),
    *("--set", "service.externalTrafficPolicy=Local"),
]
for _component in ("operator", "dataplane"):
    PLACEMENT += [
        *("--set", f"{_component}.priorityClassName=system-cluster-critical"),
        *("--set", f"{_component}.podLabels.team=edge"),
        *("--set", f"{_component}.podAnnotations.note=hi"),
        *("--set", f"{_component}.extraArgs={{--log-level=debug}}"),
        *("--set", f"{_component}.extraEnv[0].name=TZ"),
        *("--set", f"{_component}.extraEnv[0].value=UTC"),
        *("--set", f"{_component}.tolerations[0].key=edge"),
        *("--set", f"{_component}.tolerations[0].operator=Exists"),
        *("--set", f"{_component}.nodeSelector.role=edge"),
        *(
            "--set",
            f"{_component}.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].weight=1",
        ),
        *(
            "--set",
            f"{_component}.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[0]"
            ".preference.matchExpressions[0].key=edge",
        ),
        *(
            "--set",
            f"{_component}.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[0]"
            ".preference.matchExpressions[0].operator=Exists",
        ),
    ]


def test_placement_labels_and_extras_reach_both_components() -> None:
    objects = render(*PLACEMENT)
    for obj in objects:
        if obj["apiVersion"] in BUILT_IN:
            kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    for deployment, container in containers(objects):
        template = deployment["spec"]["template"]
        pod = template["spec"]
        assert pod["priorityClassName"] == "system-cluster-critical"
        assert template["metadata"]["labels"]["team"] == "edge"
        assert template["metadata"]["annotations"] == {"note": "hi"}
        assert container["args"][-1] == "--log-level=debug"
        assert {"name": "TZ", "value": "UTC"} in container["env"]
        assert pod["tolerations"] == [{"key": "edge", "operator": "Exists"}]
        assert pod["nodeSelector"] == {"role": "edge"}
        assert pod["affinity"]["nodeAffinity"]
        # The selector stays the chart's own: extra labels never orphan the pods.
        assert "team" not in deployment["spec"]["selector"]["matchLabels"]
    service = next(
        o for o in objects if o["metadata"]["name"] == "bilayer-dataplane" and o["kind"] == "Service"
    )
    assert service["metadata"]["annotations"] == {"team": "edge"}
    assert service["spec"]["loadBalancerClass"] == "example.com/lb"
    assert service["spec"]["loadBalancerSourceRanges"] == ["10.0.0.0/8"]
    assert service["spec"]["externalTrafficPolicy"] == "Local"
    defaults = render()
    for deployment, _ in containers(defaults):
        assert "priorityClassName" not in deployment["spec"]["template"]["spec"]
    (default_service,) = [
        o for o in defaults if o["kind"] == "Service" and o["metadata"]["name"] == "bilayer-dataplane"
    ]
    assert "loadBalancerClass" not in default_service["spec"]


def test_the_operator_has_a_disruption_budget_while_it_has_a_standby() -> None:
    budgets = {o["metadata"]["name"]: o for o in render() if o["kind"] == "PodDisruptionBudget"}
    operator = budgets["bilayer-operator"]
    assert operator["spec"]["maxUnavailable"] == 1
    assert operator["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"
    single = render("--set", "operator.replicas=1")  # a budget of one replica blocks every drain
    assert "bilayer-operator" not in {
        o["metadata"]["name"] for o in single if o["kind"] == "PodDisruptionBudget"
    }
    off = render("--set", "operator.podDisruptionBudget.enabled=false")
    assert "bilayer-operator" not in {
        o["metadata"]["name"] for o in off if o["kind"] == "PodDisruptionBudget"
    }


def test_two_installs_of_two_classes_share_a_namespace_without_a_clash() -> None:
    """Internal and external ingress: each release's operator serves its class, and no
    object of one release has the name of an object of the other (helm would refuse)."""
    external = render()
    internal_result = helm(
        "template", "internal", str(CHART), "--namespace", "ingress", "--set", "className=internal"
    )
    assert internal_result.returncode == 0, internal_result.stderr
    internal = [d for d in yaml.safe_load_all(internal_result.stdout) if d]
    operators = {
        "external": next(c for _, c in containers(external) if c["name"] == "operator"),
        "internal": next(c for _, c in containers(internal) if c["name"] == "operator"),
    }
    assert "--class=bilayer" in _args(operators["external"])
    assert "--class=internal" in _args(operators["internal"])
    names = {(d["kind"], d["metadata"]["name"]) for d in external}
    assert not names & {(d["kind"], d["metadata"]["name"]) for d in internal}
    # Each operator's pods, Service and Lease are its own release's.
    assert any("app.kubernetes.io/instance=internal" in a for a in _args(operators["internal"]))
