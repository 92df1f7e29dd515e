"""The chart's production settings (issue 12): autoscaling, DaemonSet and host network, extra
volumes, security context overrides, name overrides, operator anti-affinity, probes, and
the `helm test` pod. Rendered by the real helm, validated against the Kubernetes schemas."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from .helpers import free_port
from .test_helm import BUILT_IN, CHART, KUBERNETES, containers, helm, render


def _valid(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for obj in objects:
        if obj["apiVersion"] in BUILT_IN:
            kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    return objects


def _one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (obj,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def _dataplane(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    return next((w, c) for w, c in containers(objects) if c["name"] == "dataplane")


def _operator(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    return next((w, c) for w, c in containers(objects) if c["name"] == "operator")


def test_the_autoscaler_is_off_by_default_and_owns_the_replicas_when_on() -> None:
    plain = render()
    assert not [o for o in plain if o["kind"] == "HorizontalPodAutoscaler"]
    assert _one(plain, "Deployment", "bilayer-dataplane")["spec"]["replicas"] == 2

    scaled = _valid(
        render(
            *("--set", "dataplane.autoscaling.enabled=true"),
            *("--set", "dataplane.autoscaling.maxReplicas=20"),
            *("--set", "dataplane.autoscaling.targetCPUUtilizationPercentage=60"),
        )
    )
    hpa = _one(scaled, "HorizontalPodAutoscaler", "bilayer-dataplane")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "bilayer-dataplane",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 20)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 60}
    # A replica count in the Deployment would reset the HPA's on every upgrade or sync.
    assert "replicas" not in _one(scaled, "Deployment", "bilayer-dataplane")["spec"]
    assert _one(scaled, "Deployment", "bilayer-operator")["spec"]["replicas"] == 2


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["--set", "dataplane.autoscaling.enabled=true", "--set", "dataplane.kind=DaemonSet"], "DaemonSet"),
        (["--set", "dataplane.autoscaling.enabled=true", "--set", "dataplane.autoscaling.minReplicas=5",
          "--set", "dataplane.autoscaling.maxReplicas=3"], "minReplicas"),
        (["--set", "dataplane.kind=StatefulSet"], "/dataplane/kind"),
        (["--set", "dataplane.autoscaling.target=70"], "target"),
        (["--set", "dataplane.hostNetwork=yes"], "/dataplane/hostNetwork"),
        (["--set", "operator.extraVolumeMounts[0].name=ca"], "mountPath"),
        (["--set", "fullnameOverride=Edge_Ingress"], "/fullnameOverride"),
    ],
)  # fmt: skip
def test_bad_production_values_fail_the_render(values: list[str], message: str) -> None:
    result = helm("template", "bilayer", str(CHART), *values)
    assert result.returncode != 0
    assert message in result.stderr


def test_a_daemonset_on_the_host_network_for_edge_l4() -> None:
    objects = _valid(render("--set", "dataplane.kind=DaemonSet", "--set", "dataplane.hostNetwork=true"))
    daemonset, _ = _dataplane(objects)
    assert daemonset["kind"] == "DaemonSet" and "replicas" not in daemonset["spec"]
    assert not [
        o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-dataplane")
    ]
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    # Without it the pod would resolve names with the node's resolver, not the cluster's.
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    # The kubelet refuses net.* sysctls in the node's network namespace: the pod would not start.
    assert "sysctls" not in pod["securityContext"]
    assert "topologySpreadConstraints" not in pod  # one pod a node already
    # The operator finds the pods by the same labels, whatever their controller.
    _, operator = _operator(objects)
    (selector,) = [a for a in operator["args"] if a.startswith("--dataplane-selector=")]
    labels = dict(item.split("=") for item in selector.split("=", 1)[1].split(","))
    assert labels.items() <= daemonset["spec"]["template"]["metadata"]["labels"].items()
    assert labels == daemonset["spec"]["selector"]["matchLabels"]
    # A drain skips DaemonSet pods, and maxUnavailable needs a scalable controller.
    budgets = {o["metadata"]["name"] for o in objects if o["kind"] == "PodDisruptionBudget"}
    assert budgets == {"bilayer-operator"}
    notes = helm(
        "install", "bilayer", str(CHART), "--dry-run", "--namespace", "ingress",
        "--set", "image.repository=registry.example/bilayer",
        "--set", "dataplane.kind=DaemonSet", "--set", "dataplane.hostNetwork=true",
    )  # fmt: skip
    assert notes.returncode == 0, notes.stderr
    assert "bind on each node's addresses" in notes.stdout

    # A Deployment keeps its sysctl, spread and budget.
    deployment, _ = _dataplane(render())
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["sysctls"] == [
        {"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}
    ]
    assert "hostNetwork" not in pod and "dnsPolicy" not in pod


VOLUMES = []
for _component in ("operator", "dataplane"):
    VOLUMES += [
        *("--set", f"{_component}.extraVolumes[0].name=ca"),
        *("--set", f"{_component}.extraVolumes[0].configMap.name=corp-ca"),
        *("--set", f"{_component}.extraVolumeMounts[0].name=ca"),
        *("--set", f"{_component}.extraVolumeMounts[0].mountPath=/etc/corp-ca"),
        *("--set", f"{_component}.extraVolumeMounts[0].readOnly=true"),
        *("--set", f"{_component}.securityContext.runAsUser=20000"),
        *("--set", f"{_component}.podSecurityContext.fsGroup=20000"),
    ]


def test_extra_volumes_and_security_overrides_reach_both_components() -> None:
    objects = _valid(render(*VOLUMES))
    for workload, container in containers(objects):
        pod = workload["spec"]["template"]["spec"]
        assert {"name": "ca", "configMap": {"name": "corp-ca"}} in pod["volumes"]
        assert {"name": "ca", "mountPath": "/etc/corp-ca", "readOnly": True} in container["volumeMounts"]
        assert {"tmp"} <= {v["name"] for v in pod["volumes"]}  # the chart's own stay
        security = container["securityContext"]
        assert security["runAsUser"] == 20000
        # An override changes one key; the secure defaults around it stay.
        assert security["runAsNonRoot"] is True and security["readOnlyRootFilesystem"] is True
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert security["allowPrivilegeEscalation"] is False
        assert pod["securityContext"]["fsGroup"] == 20000
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}


def test_unset_security_values_keep_the_secure_defaults() -> None:
    for workload, container in containers(render()):
        assert container["securityContext"] == {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        pod_security = workload["spec"]["template"]["spec"]["securityContext"]
        assert pod_security["runAsNonRoot"] is True
        assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}


def test_privileged_ports_on_the_host_network_by_the_documented_override() -> None:
    """hostNetwork loses the sysctl; the README's override (root with NET_BIND_SERVICE and
    nothing else) renders and keeps the rest of the lock-down."""
    objects = _valid(
        render(
            *("--set", "dataplane.kind=DaemonSet", "--set", "dataplane.hostNetwork=true"),
            *("--set", "dataplane.securityContext.runAsNonRoot=false"),
            *("--set", "dataplane.securityContext.runAsUser=0"),
            *("--set", "dataplane.securityContext.capabilities.add={NET_BIND_SERVICE}"),
        )
    )
    _, container = _dataplane(objects)
    security = container["securityContext"]
    assert security["capabilities"] == {"add": ["NET_BIND_SERVICE"], "drop": ["ALL"]}
    assert (security["runAsNonRoot"], security["runAsUser"]) == (False, 0)
    assert security["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize(
    ("values", "prefix", "name_label"),
    [
        ([], "bilayer", "bilayer"),
        (["--set", "nameOverride=edge"], "bilayer-edge", "edge"),
        (["--set", "fullnameOverride=public-ingress"], "public-ingress", "bilayer"),
    ],
)
def test_name_overrides(values: list[str], prefix: str, name_label: str) -> None:
    objects = _valid(render(*values))
    names = {o["metadata"]["name"] for o in objects if o["metadata"].get("namespace") == "ingress"}
    assert {f"{prefix}-operator", f"{prefix}-dataplane", f"{prefix}-admin-token", f"{prefix}-test"} <= names
    dataplane, _ = _dataplane(objects)
    assert dataplane["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == name_label
    _, operator = _operator(objects)
    args = operator["args"]
    assert f"--dataplane-service={prefix}-dataplane" in args
    assert f"--dataplane-selector=app.kubernetes.io/name={name_label}," in " ".join(args)
    service = _one(objects, "Service", f"{prefix}-dataplane")
    assert service["spec"]["selector"]["app.kubernetes.io/name"] == name_label
    role = _one(objects, "Role", f"{prefix}-operator")
    assert [f"{prefix}-dataplane"] in [r.get("resourceNames") for r in role["rules"]]


def test_operator_replicas_prefer_different_nodes_unless_affinity_is_set() -> None:
    deployment, _ = _operator(render())
    (term,) = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert (
        term["podAffinityTerm"]["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"
    )
    own, _ = _operator(
        render(
            *("--set", "operator.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
                       ".nodeSelectorTerms[0].matchExpressions[0].key=infra"),
            *("--set", "operator.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
                       ".nodeSelectorTerms[0].matchExpressions[0].operator=Exists"),
        )
    )  # fmt: skip
    assert list(own["spec"]["template"]["spec"]["affinity"]) == ["nodeAffinity"]


def test_both_components_have_resources_and_startup_probes() -> None:
    for _, container in containers(render("--set", "dataplane.startupSeconds=90")):
        resources = container["resources"]
        assert resources["requests"]["cpu"] and resources["requests"]["memory"]
        assert resources["limits"]["memory"]
        startup = container["startupProbe"]
        assert startup["httpGet"]["port"] in ("health", "metrics")
        if container["name"] == "dataplane":
            assert startup["httpGet"] == {"path": "/healthz", "port": "metrics"}
            assert startup["periodSeconds"] * startup["failureThreshold"] == 90


def test_helm_test_checks_the_operator_and_a_dataplane_with_the_charts_image() -> None:
    objects = _valid(render(*VOLUMES))
    (pod,) = [o for o in objects if o["kind"] == "Pod"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never" and spec["automountServiceAccountToken"] is False
    (container,) = spec["containers"]
    _, dataplane = _dataplane(objects)
    assert container["image"] == dataplane["image"]  # no extra image to pull
    assert container["command"][:2] == ["python", "-c"]
    compile(container["command"][2], "helm-test", "exec")  # the script at least parses
    operator_url, dataplane_url = container["command"][3:]
    assert operator_url == "http://bilayer-operator-metrics.ingress.svc:9902/readyz"
    assert dataplane_url == "http://bilayer-metrics.ingress.svc:9903/readyz"
    # The Services it asks exist without monitoring turned on, and lead to the right ports.
    operator_service = _one(objects, "Service", "bilayer-operator-metrics")
    assert operator_service["spec"]["ports"][0]["targetPort"] == "health"
    assert operator_service["spec"]["selector"]["app.kubernetes.io/component"] == "operator"
    metrics_service = _one(objects, "Service", "bilayer-metrics")
    assert metrics_service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert metrics_service["spec"]["selector"]["app.kubernetes.io/component"] == "dataplane"
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and security["capabilities"] == {"drop": ["ALL"]}
    assert security["runAsUser"] == 10001  # the components' overrides are theirs alone
    # The NetworkPolicy lets it reach the read-only port (and only that one).
    policy = next(o for o in objects if o["kind"] == "NetworkPolicy")
    admitted = [
        rule["ports"]
        for rule in policy["spec"]["ingress"]
        for peer in rule.get("from", [])
        if peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") == "test"
    ]
    assert admitted == [[{"protocol": "TCP", "port": 9903}]]


def test_the_helm_test_script_passes_on_200_answers(tmp_path: Path) -> None:
    """The pod's script, run here against two servers that answer /readyz with 200."""
    (pod,) = [o for o in render() if o["kind"] == "Pod"]
    script = pod["spec"]["containers"][0]["command"][2]
    (tmp_path / "readyz").write_text("ok")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/readyz"
        result = subprocess.run(
            [sys.executable, "-c", script, url, url], capture_output=True, text=True, timeout=70, check=False
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.count(" 200") == 2
    finally:
        server.terminate()
        server.wait(10)
