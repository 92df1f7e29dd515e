"""The chart's production settings (issue 12), rendered by the real helm and validated
against the Kubernetes schemas."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from .test_helm import BUILT_IN, CHART, KUBERNETES, helm, render


def _valid(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for obj in objects:
        if obj["apiVersion"] in BUILT_IN:
            kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    return objects


def _one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (obj,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


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
        (["--set", "dataplane.autoscaling.enabled=true", "--set", "dataplane.autoscaling.minReplicas=5",
          "--set", "dataplane.autoscaling.maxReplicas=3"], "minReplicas"),
        (["--set", "dataplane.autoscaling.target=70"], "target"),
    ],
)  # fmt: skip
def test_bad_production_values_fail_the_render(values: list[str], message: str) -> None:
    result = helm("template", "bilayer", str(CHART), *values)
    assert result.returncode != 0
    assert message in result.stderr
