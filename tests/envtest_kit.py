"""The operator on a real API server: the chart's RBAC, real processes, real backends.

- The operator runs as `bilayer operator` with the arguments `helm template` renders, and
  a kubeconfig whose identity is the chart's ServiceAccount, bound only to the Roles and
  ClusterRoles the chart renders; any 403 in its log fails the test.
- Dataplane pods are `bilayer dataplane` processes on addresses of their own in
  127.0.0.0/8; the test plays the kubelet: it creates their Pod objects, sets podIP and
  phase, and sets Ready from the dataplane's /readyz, as a readiness probe would.
- The API server refuses EndpointSlice addresses in 127.0.0.0/8, so backends live in
  network namespaces made for the test (a veth pair each, addresses in 198.18.0.0/15,
  the range set aside for network tests), removed when the test ends, failed or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import yaml

from controlplane.kube import Credentials, KubeClient, KubeError, resource_path

from .envtest import ROOT, ApiServer
from .helpers import async_wait_for, free_port, wait_for
from .operator_kit import DataplaneProcess

CHART = ROOT / "helm" / "bilayer"
BIN = Path(sys.executable).parent
ADMIN_TOKEN = "envtest-admin-token"  # the dataplanes' admin API token
RELEASE = "bilayer"
ADMIN_PORT = 9901  # the chart's dataplane.adminPort
# Pods live in 127.N.0.0/16, N chosen per test process (100-199: apart from the kmock kit's),
# so that two test runs on one machine never share a pod address.
_POD_NET = random.randint(100, 199)

# API coordinates of every kind the tests write.
KINDS: dict[str, tuple[str, str, bool]] = {  # kind -> (group/version, plural, namespaced)
    "Namespace": ("v1", "namespaces", False),
    "ServiceAccount": ("v1", "serviceaccounts", True),
    "Service": ("v1", "services", True),
    "Secret": ("v1", "secrets", True),
    "ConfigMap": ("v1", "configmaps", True),
    "Pod": ("v1", "pods", True),
    "EndpointSlice": ("discovery.k8s.io/v1", "endpointslices", True),
    "Role": ("rbac.authorization.k8s.io/v1", "roles", True),
    "RoleBinding": ("rbac.authorization.k8s.io/v1", "rolebindings", True),
    "ClusterRole": ("rbac.authorization.k8s.io/v1", "clusterroles", False),
    "ClusterRoleBinding": ("rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
    "CustomResourceDefinition": ("apiextensions.k8s.io/v1", "customresourcedefinitions", False),
    "L4Listener": ("bilayer.dev/v1alpha1", "l4listeners", True),
    "L7Route": ("bilayer.dev/v1alpha1", "l7routes", True),
    "Lease": ("coordination.k8s.io/v1", "leases", True),
}
_ids = itertools.count(1)


def path_of(kind: str, namespace: str | None = None, name: str | None = None) -> str:
    group_version, plural, namespaced = KINDS[kind]
    group, _, version = group_version.rpartition("/")
    return resource_path(group, version, plural, namespace if namespaced else None, name)


def admin_client(server: ApiServer) -> KubeClient:
    return KubeClient(Credentials(server=server.url, token=server.admin_token, ca_path=str(server.ca_path)))


async def install_crds(server: ApiServer) -> None:
    client = admin_client(server)
    try:
        for file in sorted((ROOT / "crds").glob("*.yaml")):
            crd = yaml.safe_load(file.read_text())
            with contextlib.suppress(KubeError):  # 409: installed by an earlier session step
                await client.create(path_of("CustomResourceDefinition"), crd)

            async def established(name: str = crd["metadata"]["name"]) -> bool:
                found = await client.get(path_of("CustomResourceDefinition", name=name)) or {}
                conditions = (found.get("status") or {}).get("conditions") or []
                return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

            await async_wait_for(established, deadline_s=30, what=f"CRD {file.name} established")
    finally:
        await client.close()


def helm_template(namespace: str, *values: str) -> list[dict[str, Any]]:
    helm = BIN / "helm"
    if not helm.exists():
        raise AssertionError("helm is not installed: `make test` installs it (scripts/fetch-helm)")
    # The chart has no default image; these tests run processes, never the image.
    image = ["--set", "image.repository=bilayer"]
    result = subprocess.run(
        [str(helm), "template", RELEASE, str(CHART), "--namespace", namespace, *image, *values],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return [d for d in yaml.safe_load_all(result.stdout) if d]


class Netns:
    """A network namespace with a veth pair to the host: an address that is not loopback."""

    def __init__(self) -> None:
        n = next(_ids)
        tag = f"{os.getpid() % 100000}x{n}"
        self.name = f"blt{tag}"
        self.host_if, self.ns_if = f"blh{tag}"[:15], f"bln{tag}"[:15]
        block = (os.getpid() % 120) * 2 + (n // 64) % 2  # a /24 in 198.18.0.0/15 per process
        base = (n % 64) * 4
        self.host_address = f"198.{18 + block // 256}.{block % 256}.{base + 1}"
        self.address = f"198.{18 + block // 256}.{block % 256}.{base + 2}"
        self._made = False

    def __enter__(self) -> Netns:
        ip = shutil.which("ip") or "/usr/sbin/ip"
        steps = [
            [ip, "netns", "add", self.name],
            [ip, "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if],
            [ip, "link", "set", self.ns_if, "netns", self.name],
            [ip, "addr", "add", f"{self.host_address}/30", "dev", self.host_if],
            [ip, "link", "set", self.host_if, "up"],
            [ip, "-n", self.name, "addr", "add", f"{self.address}/30", "dev", self.ns_if],
            [ip, "-n", self.name, "link", "set", self.ns_if, "up"],
            [ip, "-n", self.name, "link", "set", "lo", "up"],
        ]
        self._made = True
        try:
            for step in steps:
                subprocess.run(step, check=True, capture_output=True, timeout=10)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        if not self._made:
            return
        ip = shutil.which("ip") or "/usr/sbin/ip"
        subprocess.run([ip, "netns", "del", self.name], capture_output=True, timeout=10, check=False)
        subprocess.run([ip, "link", "del", self.host_if], capture_output=True, timeout=10, check=False)
        self._made = False


def netns_available() -> str:
    """Why network namespaces cannot be made here ("" when they can)."""
    if shutil.which("ip") is None and not os.path.exists("/usr/sbin/ip"):
        return "no `ip` (iproute2): .ci/run installs it"
    if os.geteuid() != 0:
        return "network namespaces need root"
    return ""


class Backend:
    """An HTTP server in a network namespace of its own, answering its name."""

    def __init__(self, name: str, port: int = 8080) -> None:
        self.name = name
        self.port = port
        self.netns = Netns()
        self.dir = Path(tempfile.mkdtemp(prefix=f"backend-{name}-"))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Backend:
        (self.dir / "index.html").write_text(self.name)
        self.netns.__enter__()
        ip = shutil.which("ip") or "/usr/sbin/ip"
        self.process = subprocess.Popen(
            [
                ip,
                "netns",
                "exec",
                self.netns.name,
                sys.executable,
                "-m",
                "http.server",
                str(self.port),
                "--bind",
                self.netns.address,
                "--directory",
                str(self.dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(
            lambda: fetch(self.netns.address, self.port)[0] == 200, timeout=15, what=f"backend {self.name}"
        )
        return self

    @property
    def address(self) -> str:
        return self.netns.address

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None
        self.netns.__exit__()
        shutil.rmtree(self.dir, ignore_errors=True)


def fetch(address: str, port: int, path: str = "/", host: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(f"http://{address}:{port}{path}", headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError:
        return 0, ""


class DataplanePod(DataplaneProcess):
    """A `bilayer dataplane` process, and the Pod object the kubelet would keep for it."""

    def __init__(self, cluster: EnvCluster, name: str, address: str) -> None:
        super().__init__(name, address, port=ADMIN_PORT, token=ADMIN_TOKEN, log=cluster.dir / f"{name}.log")
        self.cluster = cluster
        self.uid: str | None = None
        self.restarts = 0

    def body(self) -> dict[str, Any]:
        labels = {
            "app.kubernetes.io/name": "bilayer",
            "app.kubernetes.io/instance": RELEASE,
            "app.kubernetes.io/component": "dataplane",
        }
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": self.name, "namespace": self.cluster.namespace, "labels": labels},
            "spec": {
                "containers": [
                    {
                        "name": "dataplane",
                        "image": "bilayer:test",
                        "ports": [{"name": "admin", "containerPort": ADMIN_PORT}],
                    }
                ]
            },
        }

    def status(self, ready: bool) -> dict[str, Any]:
        return {
            "status": {
                "phase": "Running",
                "podIP": self.address,
                "podIPs": [{"ip": self.address}],
                "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                "containerStatuses": [
                    {
                        "name": "dataplane",
                        "ready": ready,
                        "restartCount": self.restarts,
                        "image": "bilayer:test",
                        "imageID": "",
                        "started": True,
                        "state": {"running": {}},
                    }
                ],
            }
        }


class OperatorProcess:
    """`bilayer operator` as the chart runs it, with a kubeconfig of the chart's ServiceAccount."""

    def __init__(
        self, cluster: EnvCluster, identity: str, kubeconfig: Path, extra: tuple[str, ...] = ()
    ) -> None:
        self.cluster = cluster
        self.identity = identity
        self.kubeconfig = kubeconfig
        self.extra = extra
        self.health = free_port()
        self.log = cluster.dir / f"operator-{identity}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        args = [a for a in self.cluster.operator_args if not a.startswith("--health-port")]
        args += [f"--health-port={self.health}", "--health-address=127.0.0.1", *self.extra]
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "BILAYER_ADMIN_TOKEN": ADMIN_TOKEN,
            "POD_NAME": self.identity,
            "POD_NAMESPACE": self.cluster.namespace,
        }
        self.process = subprocess.Popen(
            [str(BIN / "bilayer"), *args], env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT
        )
        return self

    def get(self, path: str) -> tuple[int, str]:
        return fetch("127.0.0.1", self.health, path)

    def metric(self, name: str) -> float:
        """The sum of a metric's samples (0 for a labelled family with none yet)."""
        text = self.get("/metrics")[1]
        assert f"# HELP {name} " in text, f"no metric {name}"
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name) and line[len(name)] in " {"
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None:
            self.process.send_signal(sig)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
            self.process = None

    def forbidden(self, tolerated: list[tuple[str, str]]) -> list[str]:
        """Log lines that mention a 403, except those logged in a tolerated time window."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        found = []
        for line in text.splitlines():
            if "403: " not in line and "forbidden" not in line.lower():
                continue
            stamp = json.loads(line).get("time", "") if line.startswith("{") else ""
            if not any(start <= stamp <= end for start, end in tolerated):
                found.append(line)
        return found


class EnvCluster:
    """One test's corner of the API server: a release namespace, an apps namespace, the
    chart's objects, the operator(s), dataplane pods, backends."""

    def __init__(
        self, server: ApiServer, directory: Path, *, cluster_wide: bool = False, apps_in_release: bool = False
    ) -> None:
        n = next(_ids)
        self.server = server
        self.dir = directory
        self.namespace = f"bl{os.getpid() % 100000}-{n}"
        # apps_in_release: routes and Services live in the release namespace, the only one
        # watched (a single-namespace install).
        self.apps = self.namespace if apps_in_release else f"{self.namespace}-apps"
        self.cluster_wide = cluster_wide
        self.api = admin_client(server)
        self.pods: list[DataplanePod] = []
        self.operators: list[OperatorProcess] = []
        self.backends: list[Backend] = []
        self.operator_args: list[str] = []
        self.token_file = directory / "operator-token"
        self._kubelet: asyncio.Task[None] | None = None
        # Windows (log time stamps) in which a 403 is the API server's, not the chart's:
        # a restarted kube-apiserver answers 403 until its RBAC caches are filled.
        self.tolerated: list[tuple[str, str]] = []

    # --- objects ---

    async def create(self, body: dict[str, Any], *, exist_ok: bool = False) -> dict[str, Any]:
        namespace = (body.get("metadata") or {}).get("namespace") or self.apps
        if KINDS[body["kind"]][2]:
            body = {**body, "metadata": {**body["metadata"], "namespace": namespace}}
        try:
            return await self.api.create(path_of(body["kind"], namespace), body)
        except KubeError as err:
            if exist_ok and err.status == 409:
                return {}
            raise

    async def apply(self, body: dict[str, Any]) -> None:
        """Create, or replace what exists, as `helm install` and `kubectl apply` do: of two
        objects of one name in a manifest, the later one is what the cluster keeps."""
        try:
            await self.create(body)
        except KubeError as err:
            if err.status != 409:
                raise
            meta = body["metadata"]
            await self.api.update(path_of(body["kind"], meta.get("namespace"), meta["name"]), body)

    async def patch(
        self, kind: str, name: str, body: dict[str, Any], namespace: str | None = None
    ) -> dict[str, Any]:
        return await self.api.patch(path_of(kind, namespace or self.apps, name), body)

    async def delete(self, kind: str, name: str, namespace: str | None = None) -> None:
        await self.api.delete(path_of(kind, namespace or self.apps, name))

    async def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        return await self.api.get(path_of(kind, namespace or self.apps, name))

    async def conditions(self, kind: str, name: str) -> dict[str, dict[str, Any]]:
        obj = await self.get(kind, name) or {}
        return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}

    async def wait_condition(
        self,
        kind: str,
        name: str,
        condition: str,
        *,
        status: str = "True",
        generation: int | None = None,
        reason: str | None = None,
        deadline: float = 30,
    ) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            found = (await self.conditions(kind, name)).get(condition)
            if (
                found
                and found["status"] == status
                and (generation is None or found.get("observedGeneration") == generation)
                and (reason is None or found.get("reason") == reason)
            ):
                return found
            return None

        result: dict[str, Any] = await async_wait_for(
            check, deadline_s=deadline, what=f"{kind} {name} {condition}={status} ({reason or 'any reason'})"
        )
        return result

    async def service(self, name: str, backends: list[Backend], port: int = 80) -> None:
        """A Service and the EndpointSlice the endpoint controller would write."""
        await self.create(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name},
                "spec": {
                    "ports": [
                        {"name": "http", "port": port, "targetPort": backends[0].port if backends else 8080}
                    ]
                },
            }
        )
        await self.create(self.endpoint_slice(name, backends))

    def endpoint_slice(self, service: str, backends: list[Backend]) -> dict[str, Any]:
        return {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": f"{service}-1", "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": backends[0].port if backends else 8080}],
            "endpoints": [{"addresses": [b.address], "conditions": {"ready": True}} for b in backends],
        }

    # --- the release: namespaces, the chart's objects, a token ---

    async def install(self, *values: str) -> None:
        for namespace in dict.fromkeys((self.namespace, self.apps)):
            await self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
        flags = ["--set", "operator.resyncSeconds=2"]
        if not self.cluster_wide:
            flags += ["--set", f"operator.watchNamespaces={{{self.apps}}}"]
        rendered = helm_template(self.namespace, *flags, *values)
        for obj in rendered:
            if obj["kind"] in (
                "ServiceAccount",
                "Role",
                "RoleBinding",
                "ClusterRole",
                "ClusterRoleBinding",
            ) or (obj["kind"] == "Service" and obj["metadata"]["name"] == f"{RELEASE}-dataplane"):
                await self.apply(obj)
            if obj["kind"] == "Deployment" and obj["metadata"]["name"] == f"{RELEASE}-operator":
                self.operator_args = [
                    str(a) for a in obj["spec"]["template"]["spec"]["containers"][0]["args"]
                ]
        self.write_token(await self.token())

    async def token(self, bound_secret: str | None = None) -> str:
        """A token of the chart's operator ServiceAccount (TokenRequest), optionally bound
        to a Secret: deleting the Secret makes the token invalid, as expiry would."""
        spec: dict[str, Any] = {"expirationSeconds": 3600}
        if bound_secret is not None:
            secret = await self.get("Secret", bound_secret, self.namespace)
            assert secret is not None
            spec["boundObjectRef"] = {
                "kind": "Secret",
                "apiVersion": "v1",
                "name": bound_secret,
                "uid": secret["metadata"]["uid"],
            }
        answer = await self.api.create(
            path_of("ServiceAccount", self.namespace, f"{RELEASE}-operator") + "/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
        )
        return str(answer["status"]["token"])

    def write_token(self, token: str) -> None:
        """As the kubelet rotates a projected token: replace the file atomically."""
        fresh = self.token_file.with_suffix(".new")
        fresh.write_text(token)
        fresh.replace(self.token_file)

    def start_operator(self, identity: str = "operator-0", *extra: str) -> OperatorProcess:
        """The chart's operator, with extra arguments after the chart's."""
        kubeconfig = self.server.kubeconfig(self.dir / f"kubeconfig-{identity}", token_file=self.token_file)
        operator = OperatorProcess(self, identity, kubeconfig, extra).start()
        self.operators.append(operator)
        return operator

    # --- dataplane pods, and the kubelet's part ---

    async def add_pod(self, *, state_dir: bool = False) -> DataplanePod:
        n = next(_ids)
        pod = DataplanePod(self, f"dataplane-{len(self.pods)}", f"127.{_POD_NET}.{n // 200}.{n % 200 + 2}")
        if state_dir:
            pod.state_dir = self.dir / f"{pod.name}-state"
        await asyncio.to_thread(pod.start)
        created = await self.create(pod.body())
        pod.uid = created["metadata"]["uid"]
        await self.set_pod_status(pod, ready=False)
        self.pods.append(pod)
        if self._kubelet is None:
            self._kubelet = asyncio.create_task(self._readiness())
        return pod

    async def set_pod_status(self, pod: DataplanePod, *, ready: bool) -> None:
        await self.api.patch(path_of("Pod", self.namespace, pod.name) + "/status", pod.status(ready))

    async def _readiness(self) -> None:
        """The kubelet's readiness probe: Ready follows the dataplane's /readyz."""
        known: dict[str, bool] = {}
        while True:
            for pod in list(self.pods):
                if pod.process is None:
                    continue
                ready = await asyncio.to_thread(pod.probe, "/readyz") == 200
                if known.get(pod.name) != ready:
                    with contextlib.suppress(KubeError, OSError):
                        await self.set_pod_status(pod, ready=ready)
                        known[pod.name] = ready
            await asyncio.sleep(0.2)

    async def restart_pod(self, pod: DataplanePod) -> None:
        """The container restarts (no saved table unless it has a state dir)."""
        await asyncio.to_thread(pod.stop)
        pod.restarts += 1
        await asyncio.to_thread(pod.start)
        await self.set_pod_status(pod, ready=False)

    async def serves(self, pod: DataplanePod, port: int, body: str, path: str = "/") -> None:
        async def check() -> bool:
            status, text = await asyncio.to_thread(fetch, pod.address, port, path)
            return status == 200 and text == body

        await async_wait_for(check, deadline_s=30, what=f"{pod.name} to answer {body!r} on {port}")

    def backend(self, name: str) -> Backend:
        backend = Backend(name).start()
        self.backends.append(backend)
        return backend

    async def close(self) -> None:
        if self._kubelet is not None:
            self._kubelet.cancel()
            await asyncio.gather(self._kubelet, return_exceptions=True)
        for operator in self.operators:
            await asyncio.to_thread(operator.stop)
        for pod in self.pods:
            await asyncio.to_thread(pod.stop)
        for backend in self.backends:
            await asyncio.to_thread(backend.stop)
        # The API server has no namespace controller: remove our routes ourselves, so a
        # cluster-wide operator of a later test does not see them.
        for kind in ("L7Route", "L4Listener"):
            with contextlib.suppress(KubeError, OSError):
                await self.api._request("DELETE", path_of(kind, self.apps))
        await self.api.close()

    def assert_no_forbidden(self) -> None:
        for operator in self.operators:
            lines = operator.forbidden(self.tolerated)
            assert not lines, f"the chart's RBAC is not enough for {operator.identity}: {lines[:3]}"


@asynccontextmanager
async def env_cluster(
    server: ApiServer, directory: Path, *, cluster_wide: bool = False, apps_in_release: bool = False
) -> AsyncIterator[EnvCluster]:
    cluster = EnvCluster(server, directory, cluster_wide=cluster_wide, apps_in_release=apps_in_release)
    try:
        await cluster.install()
        yield cluster
        cluster.assert_no_forbidden()
    finally:
        await cluster.close()


def kubectl(server: ApiServer, directory: Path, *args: str) -> str:
    binary = BIN / "kubectl"
    if not binary.exists():
        raise AssertionError("kubectl is not installed: `make test` installs it (scripts/fetch-helm)")
    config = server.kubeconfig(directory / "kubeconfig-admin")
    result = subprocess.run(
        [str(binary), "--kubeconfig", str(config), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout
