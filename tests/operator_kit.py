"""A cluster on this machine: kmock's emulator, kopf in its own thread, real dataplane processes.

Each dataplane "pod" is a `bilayer dataplane` process bound to its own loopback address
(127.N.M.2, 127.N.M.3, ...; N.M chosen per test process), as pods have their own IPs; its
Pod object in the emulator carries that address and the admin port.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import kmock

from controlplane.cluster import Operator, OperatorSettings
from controlplane.kube import Credentials, KubeClient, resource_path
from controlplane.main import run

from .helpers import async_wait_for, wait_for
from .kube_emulator import Emulator

NAMESPACE = "bilayer-system"
TOKEN = "operator-test-token"
LABELS = {"app.kubernetes.io/name": "bilayer", "app.kubernetes.io/component": "dataplane"}
ADMIN_PORT = 9911
# The pods' addresses: a /24 of 127.0.0.0/8 chosen per test process, so that two test runs
# on one machine (worktrees, a CI job beside a developer's run) never share a pod address.
_POD_NET = f"127.{random.randint(2, 99)}.{random.randint(0, 255)}"


def pod_address(host: int) -> str:
    return f"{_POD_NET}.{host}"


class DataplaneProcess:
    """A `bilayer dataplane` process on an address of its own, as a pod has its own IP.
    The kmock and envtest kits (and bench/control.py) play pods with it."""

    def __init__(
        self, name: str, address: str, *, port: int = ADMIN_PORT, token: str = TOKEN, log: Path | None = None
    ) -> None:
        self.name = name
        self.address = address
        self.admin_port = port
        self.token = token
        self.log = log
        self.state_dir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        bilayer = Path(sys.executable).with_name("bilayer")
        args = [
            str(bilayer),
            "dataplane",
            "--address",
            self.address,
            "--admin-address",
            self.address,
            "--admin-port",
            str(self.admin_port),
            "--drain-grace",
            "1",
            "--no-access-log",
        ]
        if self.state_dir is not None:
            args += ["--state-dir", str(self.state_dir)]
        output = self.log.open("ab") if self.log is not None else subprocess.DEVNULL
        self.process = subprocess.Popen(
            args,
            env={**os.environ, "BILAYER_ADMIN_TOKEN": self.token},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        wait_for(lambda: self.probe("/healthz") == 200, timeout=20, what=f"{self.name} to answer /healthz")

    def probe(self, path: str) -> int:
        """The status of an unauthenticated GET (0: no answer)."""
        try:
            with urllib.request.urlopen(
                f"http://{self.address}:{self.admin_port}{path}", timeout=1
            ) as response:
                return int(response.status)
        except urllib.error.HTTPError as err:
            return int(err.code)
        except OSError:
            return 0

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(20)
            self.process = None

    def _get(self, path: str) -> bytes:
        request = urllib.request.Request(
            f"http://{self.address}:{self.admin_port}{path}",
            headers={"Authorization": f"Bearer {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            body: bytes = response.read()
            return body

    def metric(self, name: str) -> float:
        """One unlabelled sample from the pod's /metrics."""
        for line in self._get("/metrics").decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"no metric {name} on {self.name}")

    def served(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self._get("/v1/table"))
        return result


class DataplanePod(DataplaneProcess):
    """A dataplane process and the Pod object the emulator holds for it."""

    def __init__(
        self,
        index: int,
        state_dir: Path | None = None,
        *,
        ready: bool = True,
        labels: dict[str, str] | None = None,
        prefix: str = "dataplane",
    ) -> None:
        super().__init__(f"{prefix}-{index}", pod_address(index + 2))
        self.ready = ready
        self.uid = f"{prefix}-uid-{index}" if prefix != "dataplane" else f"uid-{index}"
        self.state_dir = state_dir
        self.labels = labels or LABELS

    def body(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": self.name, "namespace": NAMESPACE, "uid": self.uid, "labels": self.labels},
            "spec": {
                "containers": [
                    {"name": "dataplane", "ports": [{"name": "admin", "containerPort": ADMIN_PORT}]}
                ]
            },
            "status": {
                "phase": "Running",
                "podIP": self.address,
                "conditions": [{"type": "Ready", "status": "True" if self.ready else "False"}],
            },
        }


class Cluster:
    """The API (emulator), a client for the test, the operator, the dataplane pods."""

    def __init__(
        self,
        emulator: Emulator,
        url: str,
        api: KubeClient,
        *,
        install: str = "",
        first_address: int = 0,
    ) -> None:
        self.emulator = emulator
        self.url = url
        self.api = api
        # A second install (sibling) on the same API: pods of its own labels and addresses.
        self.install = install
        self.first_address = first_address
        self.siblings: list[Cluster] = []
        self.pods: list[DataplanePod] = []
        self.state: dict[str, Any] = {}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def operator(self) -> Operator:
        operator: Operator = self.state["operator"]
        return operator

    # --- objects ---

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        group_version = body["apiVersion"]
        group, _, version = group_version.rpartition("/")
        plural = _plural(body["kind"])
        namespace = body.get("metadata", {}).get("namespace", "default")
        return await self.api.create(resource_path(group, version, plural, namespace), body)

    async def patch(
        self, kind: str, namespace: str, name: str, body: dict[str, Any], group_version: str = ""
    ) -> dict[str, Any]:
        group, _, version = (group_version or _group_version(kind)).rpartition("/")
        return await self.api.patch(resource_path(group, version, _plural(kind), namespace, name), body)

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        group, _, version = _group_version(kind).rpartition("/")
        async with self.api.session.delete(
            resource_path(group, version, _plural(kind), namespace, name)
        ) as response:
            assert response.status < 300, await response.text()

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        group, _, version = _group_version(kind).rpartition("/")
        return await self.api.get(resource_path(group, version, _plural(kind), namespace, name))

    async def conditions(self, kind: str, namespace: str, name: str) -> dict[str, dict[str, Any]]:
        obj = await self.get(kind, namespace, name) or {}
        return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}

    async def wait_condition(
        self,
        kind: str,
        name: str,
        condition: str,
        *,
        status: str = "True",
        namespace: str = "default",
        generation: int | None = None,
    ) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            found = (await self.conditions(kind, namespace, name)).get(condition)
            if (
                found
                and found["status"] == status
                and (generation is None or found.get("observedGeneration") == generation)
            ):
                return found
            return None

        result: dict[str, Any] = await async_wait_for(
            check, deadline_s=30, what=f"{kind} {name} {condition}={status}"
        )
        return result

    # --- dataplane pods ---

    async def add_pod(self, state_dir: Path | None = None, *, ready: bool = True) -> DataplanePod:
        pod = DataplanePod(
            self.first_address + len(self.pods),
            state_dir,
            ready=ready,
            labels=self.pod_labels,
            prefix=self.install or "dataplane",
        )
        await asyncio.to_thread(pod.start)
        self.pods.append(pod)
        await self.create(pod.body())
        return pod

    @property
    def pod_labels(self) -> dict[str, str]:
        """Labels of this install's pods: the chart's, the release name telling installs apart
        (the default operator's selector, LABELS alone, matches them all)."""
        return {**LABELS, "app.kubernetes.io/instance": self.install or "bilayer"}

    async def sibling(self, install: str, first_address: int = 10) -> Cluster:
        """A second install on this API: its own dataplane pods (labelled with the install,
        from pod_address(first_address + 2)) and Service; start its operator with
        sibling.start_operator(**sibling.operator_settings(...))."""
        other = Cluster(self.emulator, self.url, self.api, install=install, first_address=first_address)
        self.siblings.append(other)
        await other.create(_dataplane_service(f"{install}-dataplane"))
        return other

    def operator_settings(self, class_name: str) -> dict[str, Any]:
        """start_operator's settings for this install's operator, of class class_name."""
        return {
            "class_name": class_name,
            "identity": f"{self.install or 'test'}-operator",
            "dataplane_labels": self.pod_labels,
            "dataplane_service": f"{self.install}-dataplane" if self.install else "bilayer-dataplane",
        }

    # --- the operator ---

    async def start_operator(self, **overrides: Any) -> None:
        defaults: dict[str, Any] = {
            "namespace": NAMESPACE,
            "identity": "test-operator",
            "admin_port": ADMIN_PORT,
            "admin_token": TOKEN,
            "leader_election": False,
            "holdoff": 0.02,
            "max_holdoff": 0.2,
            "resync": 2.0,
            "status_delay": 0.05,
            "health_port": None,
        }
        settings = OperatorSettings(**{**defaults, **overrides})
        url = self.url

        def login(**_: Any) -> Credentials:
            return Credentials(server=url, insecure=True)

        self._stop.clear()
        self._ready.clear()
        self.state = {}

        def main() -> None:
            asyncio.run(
                run(settings, login=login, stop_flag=self._stop, ready_flag=self._ready, state=self.state)
            )

        self._thread = threading.Thread(target=main, name="kopf", daemon=True)
        self._thread.start()
        # Wait without blocking this loop: it serves the emulator the operator talks to.
        if not await asyncio.to_thread(self._ready.wait, 30):
            raise AssertionError("the operator did not start")

    async def stop_operator(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
            self._thread = None

    def call(self, fn: Any) -> Any:
        """Run fn() in the operator's own event loop (its objects are not thread-safe)."""
        loop = self.state["loop"]
        return asyncio.run_coroutine_threadsafe(_call(fn), loop).result(10)


async def _call(fn: Any) -> Any:
    return fn()


def _plural(kind: str) -> str:
    return {
        "L4Listener": "l4listeners",
        "L7Route": "l7routes",
        "Service": "services",
        "EndpointSlice": "endpointslices",
        "Secret": "secrets",
        "Pod": "pods",
    }[kind]


def _group_version(kind: str) -> str:
    return {
        "L4Listener": "bilayer.dev/v1alpha1",
        "L7Route": "bilayer.dev/v1alpha1",
        "Service": "v1",
        "EndpointSlice": "discovery.k8s.io/v1",
        "Secret": "v1",
        "Pod": "v1",
    }[kind]


@asynccontextmanager
async def running_cluster() -> AsyncIterator[Cluster]:
    async with Emulator() as emulator, kmock.Server(emulator) as server:
        url = str(server.url).rstrip("/")
        api = KubeClient(Credentials(server=url))
        cluster = Cluster(emulator, url, api)
        await cluster.create(_dataplane_service("bilayer-dataplane"))
        try:
            yield cluster
        finally:
            for each in [*cluster.siblings, cluster]:
                await each.stop_operator()
                for pod in each.pods:
                    await asyncio.to_thread(pod.stop)
            await api.close()


def write_kubeconfig(path: Path, server: str, token: str = "x") -> Path:
    """A kubeconfig naming server with a bearer token, for `bilayer operator` processes
    pointed at the emulator."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "e",
        "clusters": [{"name": "e", "cluster": {"server": server}}],
        "users": [{"name": "e", "user": {"token": token}}],
        "contexts": [{"name": "e", "context": {"cluster": "e", "user": "e"}}],
    }
    path.write_text(json.dumps(config))
    return path


def _dataplane_service(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"type": "LoadBalancer", "ports": [{"name": "placeholder", "port": 80, "targetPort": 80}]},
    }
