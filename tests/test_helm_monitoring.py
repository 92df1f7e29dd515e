"""The chart's Grafana dashboard and PrometheusRule: they render, the dashboard is JSON, and
every metric they query is one that a running dataplane and operator really expose."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes_validate

from .helpers import async_wait_for, free_port, wait_for
from .test_helm import KUBERNETES, ROOT, render

BIN = Path(sys.executable).parent
METRIC = re.compile(r"\bbilayer_[a-z0-9_]+")
MONITORING = ["--set", "metrics.dashboard.enabled=true", "--set", "metrics.prometheusRule.enabled=true"]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status), response.read().decode()
    except OSError:
        return 0, ""


def exposed(text: str) -> set[str]:
    """Every name a query may use: sample names, and families declared with no sample yet
    (a labelled counter before its first increment) with the suffixes their samples take."""
    names = {
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")
    }
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


def dataplane_metrics(tmp_path: Path) -> str:
    """A scrape of `bilayer run` serving the quick start (an L7 route and an L4 listener),
    after a request, so that every listener kind has reported."""
    folder = tmp_path / "routes"
    shutil.copytree(ROOT / "examples" / "quickstart", folder, ignore=shutil.ignore_patterns("site"))
    http, tcp, admin = free_port(), free_port(), free_port()
    routes = folder / "routes.yaml"
    routes.write_text(
        routes.read_text().replace("port: 8080", f"port: {http}").replace("port: 8082", f"port: {tcp}")
    )
    process = subprocess.Popen(
        [str(BIN / "bilayer"), "run", "-f", str(folder), "--address=127.0.0.1", f"--admin-port={admin}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _get(f"http://127.0.0.1:{admin}/readyz")[0] == 200, timeout=30, what="bilayer run")
        _get(f"http://127.0.0.1:{http}/")  # 503 or 502 without the backend: counted all the same
        status, text = _get(f"http://127.0.0.1:{admin}/metrics")
        assert status == 200
        return text
    finally:
        process.terminate()
        process.wait(30)


async def operator_metrics(tmp_path: Path) -> str:
    """A scrape of `bilayer operator` against the API emulator."""
    from .operator_kit import running_cluster, write_kubeconfig

    health = free_port()
    async with running_cluster() as cluster:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", cluster.url)
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "BILAYER_ADMIN_TOKEN": "t", "POD_NAME": "op"}
        process = await asyncio.create_subprocess_exec(
            str(BIN / "bilayer"),
            "operator",
            "--namespace=ingress",
            f"--health-port={health}",
            "--health-address=127.0.0.1",
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:

            async def scraped() -> str | None:
                status, text = await asyncio.to_thread(_get, f"http://127.0.0.1:{health}/metrics")
                return text if status == 200 else None

            text: str = await async_wait_for(scraped, deadline_s=30, what="the operator's /metrics")
            return text
        finally:
            # Killed, not stopped: only its scrape matters here, and a SIGTERM this soon after
            # the start finds kopf's API discovery in flight, which kopf waits 5 s for.
            process.kill()
            await asyncio.wait_for(process.wait(), 30)


def monitoring_objects() -> tuple[dict[str, Any], dict[str, Any]]:
    objects = render(*MONITORING)
    (configmap,) = [o for o in objects if o["kind"] == "ConfigMap"]
    (rule,) = [o for o in objects if o["kind"] == "PrometheusRule"]
    return configmap, rule


def test_monitoring_is_off_by_default() -> None:
    assert not [o for o in render() if o["kind"] in ("ConfigMap", "PrometheusRule")]


def test_the_dashboard_and_the_alerts_render() -> None:
    configmap, rule = monitoring_objects()
    kubernetes_validate.validate(configmap, KUBERNETES, strict=True)
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(configmap["data"]["bilayer.json"])
    assert dashboard["uid"] == "bilayer" and len(dashboard["panels"]) >= 8
    alerts = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
    assert set(alerts) == {
        "BilayerDataplaneNotProgrammed",
        "BilayerTableRefused",
        "BilayerPushesFailing",
        "BilayerHigh5xxRatio",
        "BilayerOperatorDown",
    }
    assert alerts["BilayerDataplaneNotProgrammed"]["for"] == "10m"
    assert 'namespace="ingress"' in alerts["BilayerOperatorDown"]["expr"]
    tuned = render(*MONITORING, "--set", "metrics.prometheusRule.notProgrammedMinutes=3")
    (rule,) = [o for o in tuned if o["kind"] == "PrometheusRule"]
    assert rule["spec"]["groups"][0]["rules"][0]["for"] == "3m"


async def test_every_queried_metric_exists_in_a_real_scrape(tmp_path: Path) -> None:
    configmap, rule = monitoring_objects()
    dashboard = json.loads(configmap["data"]["bilayer.json"])
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    queries += [t["query"]["query"] for t in dashboard["templating"]["list"] if t["type"] == "query"]
    queries += [r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]]
    wanted = {name for query in queries for name in METRIC.findall(query)}
    assert len(wanted) >= 10
    # Two processes to start and scrape, independent of each other: at once.
    dataplane, operator = await asyncio.gather(
        asyncio.to_thread(dataplane_metrics, tmp_path), operator_metrics(tmp_path)
    )
    scraped = exposed(dataplane) | exposed(operator)
    assert not wanted - scraped, f"queried but never exposed: {sorted(wanted - scraped)}"
