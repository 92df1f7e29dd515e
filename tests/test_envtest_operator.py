"""The operator on a real kube-apiserver + etcd, under the chart's RBAC (see envtest_kit)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from .envtest import ApiServer
from .envtest_kit import EnvCluster, env_cluster, fetch, kubectl, netns_available
from .helpers import async_wait_for, free_port

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def netns() -> None:
    why = netns_available()
    if why:
        pytest.skip(why)


def l7route(name: str, port: int, service: str = "web", path: str = "/") -> dict[str, object]:
    return {
        "apiVersion": "bilayer.dev/v1alpha1",
        "kind": "L7Route",
        "metadata": {"name": name},
        "spec": {
            "port": port,
            "rules": [
                {"matches": [{"path": {"value": path}}], "backendRefs": [{"name": service, "port": 80}]}
            ],
        },
    }


def l4listener(name: str, port: int, service: str = "web") -> dict[str, object]:
    return {
        "apiVersion": "bilayer.dev/v1alpha1",
        "kind": "L4Listener",
        "metadata": {"name": name},
        "spec": {"port": port, "backendRefs": [{"name": service, "port": 80}]},
    }


CHART_PORT = 80  # the chart's service.initialPort


async def service_ports(cluster: EnvCluster) -> list[int]:
    service = await cluster.get("Service", "bilayer-dataplane", cluster.namespace) or {}
    return sorted(p["port"] for p in service["spec"]["ports"])


async def test_lifecycle_on_the_real_api_server(apiserver: ApiServer, tmp_path: Path, netns: None) -> None:
    """Both kinds created, updated, deleted; status by the real server; traffic through
    fresh pods that become Ready only once the operator has pushed them a table."""
    async with env_cluster(apiserver, tmp_path, cluster_wide=True) as cluster:
        web, other = cluster.backend("web"), cluster.backend("other")
        await cluster.service("web", [web])
        pods = [await cluster.add_pod(), await cluster.add_pod()]
        operator = cluster.start_operator()
        http, tcp = free_port(), free_port()
        await cluster.create(l7route("api", http))
        programmed = await cluster.wait_condition("L7Route", "api", "Programmed", generation=1)
        assert programmed["reason"] == "Programmed"
        for pod in pods:  # fresh pods: pushed though not Ready, then Ready (readiness = a table)
            await cluster.serves(pod, http, "web")
            await async_wait_for(lambda pod=pod: pod.probe("/readyz") == 200, what="ready")
        conditions = await cluster.conditions("L7Route", "api")
        assert conditions["Accepted"]["status"] == "True" and conditions["ResolvedRefs"]["status"] == "True"

        # Printer columns, as a user sees them.
        table = await asyncio.to_thread(kubectl, apiserver, tmp_path, "get", "l7routes", "-n", cluster.apps)
        header, row = table.splitlines()[:2]
        assert header.split() == ["NAME", "PORT", "CLASS", "HOSTNAMES", "ACCEPTED", "PROGRAMMED", "AGE"]
        assert row.split()[:2] == ["api", str(http)] and row.split()[-3:-1] == ["True", "True"]

        # Update: generation 2 is programmed, traffic follows.
        await cluster.patch(
            "L7Route",
            "api",
            {
                "spec": {
                    "rules": [
                        {
                            "matches": [{"path": {"value": "/v2"}}],
                            "backendRefs": [{"name": "web", "port": 80}],
                        }
                    ]
                }
            },
        )
        await cluster.wait_condition("L7Route", "api", "Programmed", generation=2)
        assert (await asyncio.to_thread(fetch, pods[0].address, http, "/"))[0] == 404

        # An L4Listener; the dataplane Service gets its port.
        await cluster.create(l4listener("tcp", tcp))
        await cluster.wait_condition("L4Listener", "tcp", "Programmed")
        await cluster.serves(pods[1], tcp, "web")
        await cluster.patch("L4Listener", "tcp", {"spec": {"loadBalancing": {"policy": "LeastConnections"}}})
        await cluster.wait_condition("L4Listener", "tcp", "Programmed", generation=2)
        table = await asyncio.to_thread(
            kubectl, apiserver, tmp_path, "get", "l4listeners", "-n", cluster.apps
        )
        assert "True" in table.splitlines()[1].split()
        await async_wait_for(lambda: _ports_are(cluster, [http, tcp]), what="Service ports")

        # EndpointSlice change: traffic moves to the other backend.
        await cluster.patch("EndpointSlice", "web-1", {"endpoints": [{"addresses": [other.address]}]})
        await cluster.serves(pods[0], tcp, "other")

        # Delete both: listeners gone on every pod, the Service keeps the chart's port.
        await cluster.delete("L7Route", "api")
        await cluster.delete("L4Listener", "tcp")
        for pod in pods:
            await async_wait_for(lambda pod=pod: not pod.served()["listeners"], what="listeners removed")
        await async_wait_for(lambda: _ports_are(cluster, []), what="the chart's port alone")

        # The operator's own endpoints.
        assert operator.get("/healthz")[0] == 200 and operator.get("/readyz")[0] == 200
        assert operator.metric("bilayer_operator_leader") == 1
        assert operator.metric("bilayer_operator_pushes_total") >= 4
        assert operator.metric("bilayer_operator_status_writes_total") >= 3


async def test_udp_and_tcp_on_one_port_in_the_service(apiserver: ApiServer, tmp_path: Path) -> None:
    """The real API server takes two Service ports with one number (TCP and UDP) through the
    operator's server-side apply, and the chart's NetworkPolicy with a UDP rule."""
    async with env_cluster(apiserver, tmp_path) as cluster:
        dns = {"name": "dns", "port": 53, "targetPort": 5353}
        await cluster.create(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "dns"},
                "spec": {
                    "ports": [{**dns, "protocol": "UDP"}, {**dns, "name": "dns-tcp", "protocol": "TCP"}]
                },
            }
        )
        cluster.start_operator()
        port = free_port()
        udp = l4listener("dns-udp", port, "dns")
        udp["spec"] = {"port": port, "protocol": "UDP", "backendRefs": [{"name": "dns", "port": 53}]}
        await cluster.create(udp)
        tcp = l4listener("dns-tcp", port, "dns")
        tcp["spec"] = {"port": port, "backendRefs": [{"name": "dns", "port": 53}]}
        await cluster.create(tcp)
        for name in ("dns-udp", "dns-tcp"):
            await cluster.wait_condition("L4Listener", name, "Accepted")
        both = [("http-80", CHART_PORT, "TCP"), (f"tcp-{port}", port, "TCP"), (f"udp-{port}", port, "UDP")]

        async def entries() -> list[tuple[str, int, str]]:
            service = await cluster.get("Service", "bilayer-dataplane", cluster.namespace) or {}
            return sorted((p["name"], p["port"], p["protocol"]) for p in service["spec"]["ports"])

        async def has_both() -> bool:
            return await entries() == both

        await async_wait_for(has_both, 30, what="TCP and UDP entries for one port")


def now_stamp(at: float | None = None) -> str:
    """A time in the operator's log format."""
    at = time.time() if at is None else at
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1000):03d}Z"


async def _ports_are(cluster: EnvCluster, ports: list[int]) -> bool:
    """The Service holds these listener ports next to the chart's own (its initialPort,
    which the render owns: the operator applies only the listener ports)."""
    return await service_ports(cluster) == sorted([CHART_PORT, *ports])


async def test_the_crds_refuse_bad_objects_at_admission(apiserver: ApiServer, tmp_path: Path) -> None:
    """The structural schema does the first validation, before any operator sees them."""
    from controlplane.kube import KubeError

    async with env_cluster(apiserver, tmp_path) as cluster:
        bad_port = l4listener("bad-port", 70000)
        bad_path = l7route("bad-path", 8080)
        bad_path["spec"]["rules"][0]["matches"][0]["path"]["type"] = "Glob"  # type: ignore[index]
        bad_duration = l4listener("bad-duration", 8081)
        bad_duration["spec"]["timeouts"] = {"connect": "5 seconds"}  # type: ignore[index]
        no_spec = {"apiVersion": "bilayer.dev/v1alpha1", "kind": "L7Route", "metadata": {"name": "no-spec"}}
        bad_class = l7route("bad-class", 8080)
        bad_class["spec"]["className"] = "Internal_Ingress"  # type: ignore[index]
        long_class = l4listener("long-class", 8081)
        long_class["spec"]["className"] = "a" * 64  # type: ignore[index]
        cases = [
            (bad_port, "spec.port"),
            (bad_path, "spec.rules[0].matches[0].path.type"),
            (bad_duration, "spec.timeouts.connect"),
            (no_spec, "spec"),
            (bad_class, "spec.className"),
            (long_class, "spec.className"),
        ]
        for body, field in cases:
            with pytest.raises(KubeError) as refused:
                await cluster.create(body)
            assert refused.value.status == 422 and field in str(refused.value), str(refused.value)
        # A DNS label is a class, stored as written.
        internal = l7route("internal-class", 8080)
        internal["spec"]["className"] = "internal-2"  # type: ignore[index]
        created = await cluster.create(internal)
        assert created["spec"]["className"] == "internal-2"
        await cluster.delete("L7Route", "internal-class")


async def test_port_conflicts_and_listener_failures(
    apiserver: ApiServer, tmp_path: Path, netns: None
) -> None:
    """Port conflicts by age; a port a pod cannot open shows as ListenerFailed (today's
    operator said Programmed=True while the pods logged `address already in use`)."""
    import socket

    async with env_cluster(apiserver, tmp_path) as cluster:
        web = cluster.backend("web")
        await cluster.service("web", [web])
        pod = await cluster.add_pod()
        cluster.start_operator()
        port, taken = free_port(), free_port()
        first = await cluster.create(l4listener("first", port))
        # creationTimestamp has one-second resolution: the second must be younger.
        stamp = first["metadata"]["creationTimestamp"]
        await async_wait_for(
            lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) > stamp, what="the next second"
        )
        await cluster.create(l4listener("second", port))
        refused = await cluster.wait_condition("L4Listener", "second", "Accepted", status="False")
        assert refused["reason"] == "PortConflict" and f"{cluster.apps}/first" in refused["message"]
        await cluster.wait_condition("L4Listener", "first", "Programmed")

        squatter = socket.socket()
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind((pod.address, taken))
        squatter.listen()
        try:
            await cluster.create(l7route("blocked", taken))
            failed = await cluster.wait_condition(
                "L7Route", "blocked", "Programmed", status="False", reason="ListenerFailed"
            )
            assert "address already in use" in failed["message"] and pod.name in failed["message"]
        finally:
            squatter.close()
        # The other listeners stay programmed.
        assert (await cluster.conditions("L4Listener", "first"))["Programmed"]["status"] == "True"
        await cluster.delete("L4Listener", "first")
        await cluster.wait_condition("L4Listener", "second", "Programmed")
        await cluster.serves(pod, port, "web")


async def test_a_restarted_pod_and_deletions_while_the_operator_is_down(
    apiserver: ApiServer, tmp_path: Path, netns: None
) -> None:
    async with env_cluster(apiserver, tmp_path) as cluster:
        web = cluster.backend("web")
        await cluster.service("web", [web])
        pod = await cluster.add_pod()
        operator = cluster.start_operator()
        keep, drop = free_port(), free_port()
        await cluster.create(l7route("keep", keep))
        await cluster.create(l4listener("drop", drop))
        await cluster.wait_condition("L7Route", "keep", "Programmed")
        await cluster.wait_condition("L4Listener", "drop", "Programmed")

        # The container restarts without its table: the kubelet's Pod update brings a push.
        await cluster.restart_pod(pod)
        await cluster.serves(pod, keep, "web")

        # Deleted while no operator runs: gone from every table when one comes back.
        await asyncio.to_thread(operator.stop)
        await cluster.delete("L4Listener", "drop")
        assert str(drop) in pod.served()["listeners"]  # nobody told the pod yet
        cluster.start_operator("operator-1")
        await async_wait_for(
            lambda: str(drop) not in pod.served()["listeners"], deadline_s=30, what="drop removed"
        )
        assert str(keep) in pod.served()["listeners"]
        await async_wait_for(lambda: _ports_are(cluster, [keep]), what="the Service to lose the port")


async def test_two_replicas_one_lease_failover_and_fencing(apiserver: ApiServer, tmp_path: Path) -> None:
    """Two operators, one Lease: only the holder pushes; on SIGTERM it releases the Lease
    and the standby takes over at once; on SIGKILL within the lease duration. Every push
    carries the term, and a pod refuses an older one."""
    import json
    import signal
    import urllib.request

    async with env_cluster(apiserver, tmp_path) as cluster:
        await cluster.create(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "web"},
                "spec": {"ports": [{"name": "http", "port": 80}]},
            }
        )
        pod = await cluster.add_pod()
        # The lease's timing shortened (the chart's is client-go's 15/10/2 s): the SIGKILL
        # failover below waits out a whole lease.
        timing = ("--lease-duration=6", "--renew-deadline=4", "--retry-period=1")
        a, b = cluster.start_operator("operator-a", *timing), cluster.start_operator("operator-b", *timing)
        operators = {"operator-a": a, "operator-b": b}

        async def holder() -> str | None:
            lease = await cluster.get("Lease", "bilayer-operator", cluster.namespace)
            return ((lease or {}).get("spec") or {}).get("holderIdentity")

        first = operators[await async_wait_for(holder, what="a leader")]
        second = b if first is a else a
        # The standby may still be starting (its first listing) when the leader has
        # programmed the route: its metrics are read once it is ready.
        await async_wait_for(lambda: second.get("/readyz")[0] == 200, deadline_s=30, what="the standby")
        await cluster.create(l7route("one", free_port()))
        await cluster.wait_condition("L7Route", "one", "Programmed")
        term = pod.served()["term"]
        assert term.endswith("/" + first.identity)
        assert (
            second.metric("bilayer_operator_leader") == 0
            and second.metric("bilayer_operator_pushes_total") == 0
        )

        # SIGTERM: the leader releases the Lease; the standby acts within a retry period or two.
        started = time.monotonic()
        await asyncio.to_thread(first.stop)
        await cluster.create(l7route("two", free_port()))
        await cluster.wait_condition("L7Route", "two", "Programmed")
        handover = time.monotonic() - started
        assert pod.served()["term"].endswith("/" + second.identity)
        assert handover < 8, handover

        # SIGKILL: no release; the standby waits out the lease (6 s) on its own clock, where
        # one that did not wait would act within a retry period (1 s).
        restarted = cluster.start_operator(first.identity, *timing)
        await async_wait_for(lambda: restarted.get("/readyz")[0] == 200, deadline_s=30, what="the standby")
        killed = time.monotonic()
        await asyncio.to_thread(second.stop, signal.SIGKILL)
        await cluster.create(l7route("three", free_port()))
        await cluster.wait_condition("L7Route", "three", "Programmed", deadline=40)
        failover = time.monotonic() - killed
        assert 3 < failover < 16, failover
        newest = pod.served()["term"]
        assert newest.endswith("/" + restarted.identity)
        print(f"\nhandover after SIGTERM {handover:.1f} s, failover after SIGKILL {failover:.1f} s")

        # The deposed term is refused by the pod (fencing), whatever it pushes.
        request = urllib.request.Request(
            f"http://{pod.address}:9901/v1/table",
            method="PUT",
            data=b"{}",
            headers={"Authorization": "Bearer envtest-admin-token", "Bilayer-Term": term},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            await asyncio.to_thread(urllib.request.urlopen, request, timeout=5)
        assert refused.value.code == 403 and "older than term" in json.loads(refused.value.read())["error"]


async def test_the_operator_rides_out_an_api_server_restart(
    apiserver: ApiServer, tmp_path: Path, netns: None
) -> None:
    async with env_cluster(apiserver, tmp_path) as cluster:
        web = cluster.backend("web")
        await cluster.service("web", [web])
        pod = await cluster.add_pod()
        operator = cluster.start_operator()
        before = free_port()
        await cluster.create(l7route("before", before))
        await cluster.wait_condition("L7Route", "before", "Programmed")
        outage = now_stamp()
        await asyncio.to_thread(apiserver.stop_apiserver)
        try:
            # The pods keep serving; the operator keeps running and says it is alive.
            await cluster.serves(pod, before, "web")
            await async_wait_for(
                lambda: "watch interrupted" in operator.log.read_text(), what="the outage noticed"
            )
            assert operator.process is not None and operator.process.poll() is None
            assert operator.get("/healthz")[0] == 200
        finally:
            await asyncio.to_thread(apiserver.start_apiserver)
        # A restarted kube-apiserver says 403 for some milliseconds, until its RBAC
        # authorizer's caches are filled (seen here: 9 ms of 403s on every watch); the
        # operator retries. Only 403s in that second after readiness are tolerated.
        back = time.time()
        cluster.tolerated.append((outage, now_stamp(back + 1.0)))
        after = free_port()
        await cluster.create(l7route("after", after))
        await cluster.wait_condition("L7Route", "after", "Programmed", deadline=60)
        await cluster.serves(pod, after, "web")
        assert operator.process.poll() is None


async def test_a_rotated_service_account_token_is_picked_up(apiserver: ApiServer, tmp_path: Path) -> None:
    """Bound tokens expire; the kubelet writes a new one to the projected file. Here the
    old token is invalidated by deleting the Secret it is bound to, the new one written
    to the file: the operator reads it on the first 401 and carries on."""
    from controlplane.kube import Credentials, KubeClient, KubeError

    async with env_cluster(apiserver, tmp_path) as cluster:
        for name in ("binding-1", "binding-2"):
            await cluster.create(
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": name, "namespace": cluster.namespace},
                }
            )
        old = await cluster.token(bound_secret="binding-1")
        cluster.write_token(old)
        await cluster.create(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "web"},
                "spec": {"ports": [{"name": "http", "port": 80}]},
            }
        )
        await cluster.add_pod()
        operator = cluster.start_operator()
        await cluster.create(l7route("one", free_port()))
        await cluster.wait_condition("L7Route", "one", "Programmed")

        new = await cluster.token(bound_secret="binding-2")
        await cluster.delete("Secret", "binding-1", cluster.namespace)
        probe = KubeClient(Credentials(server=apiserver.url, token=old, ca_path=str(apiserver.ca_path)))
        try:

            async def rejected() -> bool:
                try:
                    await probe.get(f"/api/v1/namespaces/{cluster.namespace}/pods")
                except KubeError as err:
                    return err.status == 401
                return False

            await async_wait_for(rejected, what="the old token to be rejected")
        finally:
            await probe.close()
        cluster.write_token(new)
        await cluster.create(l7route("two", free_port()))
        await cluster.wait_condition("L7Route", "two", "Programmed")
        assert "service-account token reloaded" in operator.log.read_text()


async def test_an_operator_started_before_its_crds_catches_up_at_once(
    apiserver: ApiServer, tmp_path: Path
) -> None:
    """A fresh API server: the operator starts before the CRDs exist (404 on its lists),
    then they are created and the first LISTs may answer 429 "storage is (re)initializing".
    Before, a failed start was retried by kopf 60 s later; now every list retries on its
    own (honouring Retry-After) and the first route is programmed within seconds."""
    from .envtest_kit import install_crds

    fresh = ApiServer(apiserver.binaries).start()
    try:
        async with env_cluster(fresh, tmp_path) as cluster:
            await cluster.create(
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": "web"},
                    "spec": {"ports": [{"name": "http", "port": 80}]},
                }
            )
            await cluster.add_pod()
            operator = cluster.start_operator()
            await async_wait_for(
                lambda: (
                    "the server could not find the requested resource" in operator.log.read_text()
                    or "404" in operator.log.read_text()
                ),
                deadline_s=30,
                what="the operator to find no CRD",
            )
            assert operator.get("/readyz")[0] == 503  # still listing
            await install_crds(fresh)
            created = time.monotonic()
            await cluster.create(l7route("first", free_port()))
            await cluster.wait_condition("L7Route", "first", "Programmed", deadline=40)
            took = time.monotonic() - created
            throttled = operator.metric("bilayer_operator_api_throttled")
            print(f"\nprogrammed {took:.1f} s after the CRDs were created; 429 answers: {throttled:.0f}")
            assert took < 20, took
    finally:
        await asyncio.to_thread(fresh.stop)


async def test_a_single_namespace_install_watching_its_own_namespace(
    apiserver: ApiServer, tmp_path: Path
) -> None:
    """operator.watchNamespaces = [the release namespace]: the chart rendered two Roles of
    one name there, the one kept could not read routes, and the operator got 403s."""
    async with env_cluster(apiserver, tmp_path, apps_in_release=True) as cluster:
        await cluster.create(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "web"},
                "spec": {"ports": [{"name": "http", "port": 80}]},
            }
        )
        pod = await cluster.add_pod()
        operator = cluster.start_operator()
        port = free_port()
        await cluster.create(l7route("api", port))
        await cluster.wait_condition("L7Route", "api", "Programmed")
        assert str(port) in pod.served()["listeners"]
        await async_wait_for(lambda: _ports_are(cluster, [port]), what="the Service's port")
        assert operator.get("/healthz")[0] == 200


def test_kubectl_missing_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: FileNotFoundError from subprocess, with no word of where kubectl comes from."""
    import types

    from . import envtest_kit

    monkeypatch.setattr(envtest_kit, "BIN", tmp_path)  # a venv without kubectl
    server = types.SimpleNamespace(kubeconfig=lambda path: path)
    with pytest.raises(AssertionError, match="make test"):
        kubectl(server, tmp_path, "get", "pods")  # type: ignore[arg-type]


async def test_an_invalid_update_keeps_the_last_valid_generation_served(
    apiserver: ApiServer, tmp_path: Path, netns: None
) -> None:
    """An update that passes the CRD's schema but not the model (here a pattern RE2 cannot
    compile) keeps generation 1 serving; the status says both, and a fix takes over."""
    async with env_cluster(apiserver, tmp_path) as cluster:
        web = cluster.backend("web")
        await cluster.service("web", [web])
        pod = await cluster.add_pod()
        cluster.start_operator()
        port = free_port()
        await cluster.create(l7route("shop", port))
        await cluster.wait_condition("L7Route", "shop", "Programmed", generation=1)
        rules = l7route("shop", port)["spec"]["rules"]  # type: ignore[index]
        bad = [{**rules[0], "matches": [{"path": {"type": "RegularExpression", "value": "/(a)\\1"}}]}]
        await cluster.patch("L7Route", "shop", {"spec": {"rules": bad}})
        refused = await cluster.wait_condition("L7Route", "shop", "Accepted", status="False", generation=2)
        assert refused["reason"] == "Invalid"
        assert refused["message"].endswith("Until this is fixed, generation 1 is still served")
        programmed = (await cluster.conditions("L7Route", "shop"))["Programmed"]
        assert (programmed["status"], programmed["observedGeneration"]) == ("True", 1)
        await cluster.serves(pod, port, "web")
        await cluster.patch("L7Route", "shop", {"spec": {"rules": rules}})
        await cluster.wait_condition("L7Route", "shop", "Accepted", generation=3)
        await cluster.wait_condition("L7Route", "shop", "Programmed", generation=3)


async def test_grpc_matches_and_a_ca_config_map_on_the_real_api_server(
    apiserver: ApiServer, tmp_path: Path
) -> None:
    """The CRD admits gRPC matches and gRPC retry codes as numbers and names (int-or-string);
    the operator reads a CA ConfigMap under the chart's RBAC (a 403 fails the test at the
    end): the route waits with InvalidCACertificateRef until the ConfigMap exists, then
    resolves; a ConfigMap it does not name is not needed."""
    import trustme

    async with env_cluster(apiserver, tmp_path) as cluster:
        await cluster.create(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "payments"},
                "spec": {"ports": [{"name": "https", "port": 443, "appProtocol": "https"}]},
            }
        )
        cluster.start_operator()
        route = l7route("payments", free_port(), service="payments")
        rule = route["spec"]["rules"][0]  # type: ignore[index]
        rule["matches"] = [{"grpc": {"service": "shop.Payments", "method": "Charge"}}]
        rule["retry"] = {"grpcCodes": ["UNAVAILABLE", 4]}
        rule["backendRefs"] = [
            {
                "name": "payments",
                "port": 443,
                "tls": {"hostname": "payments.shop.internal", "caCertificateRefs": [{"name": "shop-ca"}]},
            }
        ]
        created = await cluster.create(route)
        assert created["spec"]["rules"][0]["retry"]["grpcCodes"] == ["UNAVAILABLE", 4]
        waiting = await cluster.wait_condition(
            "L7Route", "payments", "ResolvedRefs", status="False", reason="InvalidCACertificateRef"
        )
        assert "ConfigMap" in waiting["message"] and "shop-ca not found" in waiting["message"]
        accepted = (await cluster.conditions("L7Route", "payments"))["Accepted"]
        assert accepted["status"] == "True", accepted
        pem = trustme.CA().cert_pem.bytes().decode()
        await cluster.create(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "shop-ca"},
                "data": {"ca.crt": pem},
            }
        )
        await cluster.wait_condition("L7Route", "payments", "ResolvedRefs", status="True")
