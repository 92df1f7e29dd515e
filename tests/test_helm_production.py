"""The chart's production settings (issue 12), rendered by the real helm and validated
against the Kubernetes schemas."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

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
