"""The operator on kmock's Kubernetes emulator, programming real dataplane processes."""

from __future__ import annotations

import asyncio
import datetime
import json
import time
import urllib.request
from collections.abc import AsyncIterator

import pytest

from controlplane.kube import resource_path

from .helpers import async_wait_for, free_port
from .l7kit import HTTPBackend
from .operator_kit import NAMESPACE, Cluster, running_cluster
from .udpkit import Dnsmasq, free_udp_port, whoami

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with running_cluster() as running:
        yield running


@pytest.fixture
async def web() -> AsyncIterator[HTTPBackend]:
    backend = await HTTPBackend("web").start()
    yield backend
    await backend.stop()


def service_objects(name: str, port: int, protocol: str = "TCP") -> list[dict[str, object]]:
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": port, "protocol": protocol}]},
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{name}-1",
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": name},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": port, "protocol": protocol}],
            "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}],
        },
    ]


def l7route(name: str, port: int, path: str = "/", backend: str = "web") -> dict[str, object]:
    return {
        "apiVersion": "bilayer.dev/v1alpha1",
        "kind": "L7Route",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "port": port,
            "rules": [
                {"matches": [{"path": {"value": path}}], "backendRefs": [{"name": backend, "port": 80}]}
            ],
        },
    }


def fetch(address: str, port: int, path: str = "/") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{address}:{port}{path}", timeout=3) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError:
        return 0, ""


async def serves(cluster: Cluster, port: int, path: str, status: int = 200) -> None:
    for pod in cluster.pods:
        await async_wait_for(
            lambda pod=pod: asyncio.to_thread(fetch, pod.address, port, path),
            deadline_s=30,
            what=f"{pod.name} to serve {path} on {port}",
        ) if status == 200 else None
        got = await asyncio.to_thread(fetch, pod.address, port, path)
        if status == 200:
            assert got[0] == 200, got


async def test_route_lifecycle_programs_every_pod(cluster: Cluster, web: HTTPBackend) -> None:
    await cluster.add_pod()
    await cluster.add_pod()
    for obj in service_objects("web", web.port):
        await cluster.create(obj)
    await cluster.start_operator()
    port = free_port()
    await cluster.create(l7route("api", port, "/api"))
    programmed = await cluster.wait_condition("L7Route", "api", "Programmed", generation=1)
    assert programmed["message"] == "served by every dataplane pod that serves a table"
    conditions = await cluster.conditions("L7Route", "default", "api")
    assert conditions["Accepted"]["status"] == "True" and conditions["ResolvedRefs"]["status"] == "True"
    for pod in cluster.pods:
        status, body = await asyncio.to_thread(fetch, pod.address, port, "/api/x")
        assert status == 200 and json.loads(body)["backend"] == "web"

    # Update: a new generation, programmed again, traffic follows.
    await cluster.patch(
        "L7Route",
        "default",
        "api",
        {
            "spec": {
                "rules": [
                    {"matches": [{"path": {"value": "/v2"}}], "backendRefs": [{"name": "web", "port": 80}]}
                ]
            }
        },
    )
    await cluster.wait_condition("L7Route", "api", "Programmed", generation=2)
    for pod in cluster.pods:
        assert (await asyncio.to_thread(fetch, pod.address, port, "/api/x"))[0] == 404
        assert (await asyncio.to_thread(fetch, pod.address, port, "/v2/x"))[0] == 200
        # The change reached the pod as a delta, not as the whole table.
        assert await asyncio.to_thread(pod.metric, "bilayer_table_deltas_total") >= 1

    # Delete: the listener goes away on every pod.
    await cluster.delete("L7Route", "default", "api")
    for pod in cluster.pods:
        await async_wait_for(
            lambda pod=pod: str(port) not in pod.served()["listeners"], what="listener removed"
        )


def l4listener(name: str, port: int, backend: str = "web", protocol: str = "TCP") -> dict[str, object]:
    return {
        "apiVersion": "bilayer.dev/v1alpha1",
        "kind": "L4Listener",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"port": port, "protocol": protocol, "backendRefs": [{"name": backend, "port": 80}]},
    }


async def dataplane_service_ports(cluster: Cluster) -> list[int]:
    service = await cluster.get("Service", NAMESPACE, "bilayer-dataplane") or {}
    return [p["port"] for p in service["spec"]["ports"]]


async def test_l4_conflicts_and_service_ports(cluster: Cluster, web: HTTPBackend) -> None:
    await cluster.add_pod()
    for obj in service_objects("web", web.port):
        await cluster.create(obj)
    await cluster.start_operator()
    tcp, http = free_port(), free_port()
    await cluster.create(l4listener("first", tcp))
    await cluster.wait_condition("L4Listener", "first", "Programmed")
    await asyncio.sleep(1.1)  # creationTimestamp has one-second resolution: make "second" younger
    await cluster.create(l4listener("second", tcp))
    refused = await cluster.wait_condition("L4Listener", "second", "Accepted", status="False")
    assert refused["reason"] == "PortConflict" and "default/first" in refused["message"]
    programmed = await cluster.wait_condition("L4Listener", "second", "Programmed", status="False")
    assert programmed["reason"] == "PortConflict"
    await cluster.create(l7route("web", http))
    await cluster.wait_condition("L7Route", "web", "Programmed")
    await async_wait_for(lambda: dataplane_service_ports(cluster), what="service ports")
    assert sorted(await dataplane_service_ports(cluster)) == sorted([tcp, http])
    status, body = await asyncio.to_thread(fetch, cluster.pods[0].address, tcp, "/through-tcp")
    assert status == 200 and json.loads(body)["path"] == "/through-tcp"
    await cluster.delete("L4Listener", "default", "first")
    # The port goes to the remaining listener, and the Service keeps both ports.
    await cluster.wait_condition("L4Listener", "second", "Accepted")
    await cluster.wait_condition("L4Listener", "second", "Programmed")
    await cluster.delete("L7Route", "default", "web")

    async def only_tcp() -> bool:
        return await dataplane_service_ports(cluster) == [tcp]

    await async_wait_for(only_tcp, what="the http port to leave the Service")


async def test_a_slow_service_webhook_holds_no_compile_back(cluster: Cluster, web: HTTPBackend) -> None:
    """The dataplane Service's ports were reconciled inside the compile path: a Service
    admission webhook that takes seconds (a minute when it times out) held every compile,
    and every push, back by as long."""
    await cluster.add_pod()
    for obj in service_objects("web", web.port):
        await cluster.create(obj)
    await cluster.start_operator()
    # Longer than the 2 s bound below by a margin, and short: the Service's writes are waited for.
    cluster.emulator.write_delay["services"] = 3.0
    loop = asyncio.get_running_loop()
    ports = []
    for name in ("one", "two"):
        ports.append(free_port())
        started = loop.time()
        await cluster.create(l7route(name, ports[-1]))
        await cluster.wait_condition("L7Route", name, "Programmed")
        # Programmed in 0.1-0.5 s (measured); with the Service write in the compile, 3.9 s
        # (at 4 s a write).
        assert loop.time() - started < 2.0, name
    # The Service catches up on its own time: a write or two of 3 s each.
    await async_wait_for(lambda: _sorted_ports_are(cluster, ports), deadline_s=30, what="the Service's ports")


async def _sorted_ports_are(cluster: Cluster, ports: list[int]) -> bool:
    return sorted(await dataplane_service_ports(cluster)) == sorted(ports)


async def service_port_entries(cluster: Cluster) -> list[tuple[str, int, str]]:
    service = await cluster.get("Service", NAMESPACE, "bilayer-dataplane") or {}
    return sorted((p["name"], p["port"], p.get("protocol", "TCP")) for p in service["spec"]["ports"])


async def test_udp_and_tcp_listeners_on_one_port_reach_the_service(
    cluster: Cluster, web: HTTPBackend
) -> None:
    """DNS-style: a UDP and a TCP L4Listener on one port number. The dataplane Service gets
    two entries for it (protocol UDP and TCP), and a pod answers both."""
    server = Dnsmasq("dns").start()
    try:
        await cluster.add_pod()
        for obj in service_objects("web", web.port):
            await cluster.create(obj)
        for obj in service_objects("dns", server.port, "UDP"):
            await cluster.create(obj)
        await cluster.start_operator()
        port = free_udp_port()
        await cluster.create(l4listener("dns-udp", port, "dns", "UDP"))
        await cluster.create(l4listener("dns-tcp", port))
        await cluster.wait_condition("L4Listener", "dns-udp", "Programmed")
        await cluster.wait_condition("L4Listener", "dns-tcp", "Programmed")
        both = [(f"tcp-{port}", port, "TCP"), (f"udp-{port}", port, "UDP")]

        async def has_both() -> bool:
            return await service_port_entries(cluster) == both

        await async_wait_for(has_both, what="TCP and UDP entries for one port")
        pod = cluster.pods[0]
        assert await whoami(port, address=pod.address) == "dns"
        status, _ = await asyncio.to_thread(fetch, pod.address, port, "/over-tcp")
        assert status == 200
        await cluster.delete("L4Listener", "default", "dns-tcp")

        async def only_udp() -> bool:
            return await service_port_entries(cluster) == both[1:]

        await async_wait_for(only_udp, what="the TCP entry to leave the Service")
        assert await whoami(port, address=pod.address) == "dns"
    finally:
        server.stop()


async def test_a_udp_bind_failure_marks_the_udp_listener_only(cluster: Cluster, web: HTTPBackend) -> None:
    """A port number with a TCP and a UDP listener: the pod cannot open the UDP face (the
    address and port are taken). The UDP listener is ListenerFailed; the TCP one on the same
    number is served and Programmed (before, the error marked every listener on the number)."""
    import socket

    pod = await cluster.add_pod()
    for obj in service_objects("web", web.port):
        await cluster.create(obj)
    port = free_udp_port()
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind((pod.address, port))
    try:
        await cluster.start_operator()
        await cluster.create(l4listener("dns-udp", port, "web", "UDP"))
        await cluster.create(l4listener("dns-tcp", port))
        failed = await cluster.wait_condition("L4Listener", "dns-udp", "Programmed", status="False")
        assert failed["reason"] == "ListenerFailed" and "cannot listen on udp" in failed["message"]
        await cluster.wait_condition("L4Listener", "dns-tcp", "Programmed")
        status, _ = await asyncio.to_thread(fetch, pod.address, port, "/over-tcp")
        assert status == 200
    finally:
        taken.close()


async def test_endpoint_changes_move_traffic(cluster: Cluster, web: HTTPBackend) -> None:
    other = await HTTPBackend("other").start()
    try:
        await cluster.add_pod()
        for obj in service_objects("web", web.port):
            await cluster.create(obj)
        await cluster.start_operator()
        port = free_port()
        await cluster.create(l7route("api", port))
        await cluster.wait_condition("L7Route", "api", "Programmed")
        pod = cluster.pods[0]
        assert json.loads((await asyncio.to_thread(fetch, pod.address, port, "/"))[1])["backend"] == "web"
        await cluster.patch(
            "EndpointSlice", "default", "web-1", {"ports": [{"name": "http", "port": other.port}]}
        )

        async def moved() -> bool:
            status, body = await asyncio.to_thread(fetch, pod.address, port, "/")
            return status == 200 and json.loads(body)["backend"] == "other"

        await async_wait_for(moved, what="traffic to follow the endpoint change")
    finally:
        await other.stop()


async def test_restarted_dataplane_is_pushed_again(cluster: Cluster, web: HTTPBackend) -> None:
    pod = await cluster.add_pod()
    for obj in service_objects("web", web.port):
        await cluster.create(obj)
    await cluster.start_operator()
    port = free_port()
    await cluster.create(l7route("api", port))
    await cluster.wait_condition("L7Route", "api", "Programmed")
    await asyncio.to_thread(pod.stop)
    await asyncio.to_thread(pod.start)  # no saved table: it comes back empty
    assert pod.served()["version"] is None
    # Kubernetes reports a restarted container on the Pod: the operator checks at once.
    await cluster.patch(
        "Pod",
        NAMESPACE,
        pod.name,
        {"status": {"containerStatuses": [{"name": "dataplane", "restartCount": 1}]}},
    )

    async def repushed() -> bool:
        return pod.served()["version"] is not None

    await async_wait_for(repushed, what="the restarted pod to be pushed again")
    assert (await asyncio.to_thread(fetch, pod.address, port, "/"))[0] == 200


async def test_drift_is_repaired_by_resync(cluster: Cluster, web: HTTPBackend) -> None:
    pod = await cluster.add_pod()
    for obj in service_objects("web", web.port):
        await cluster.create(obj)
    await cluster.start_operator()  # resync every 2 s in tests
    port = free_port()
    await cluster.create(l7route("api", port))
    await cluster.wait_condition("L7Route", "api", "Programmed")
    await asyncio.to_thread(pod.stop)
    await asyncio.to_thread(pod.start)  # restarted, and no Pod event this time
    await async_wait_for(lambda: pod.served()["version"] is not None, what="resync to repush")


def weak_certificate() -> tuple[bytes, bytes]:
    """A 1024-bit RSA certificate: a valid pair to the compiler, refused by OpenSSL's
    default security level in the dataplane."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weak.example.com")])
    now = datetime.datetime.now(tz=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


async def test_a_refused_table_is_reported_and_the_old_one_keeps_serving(
    cluster: Cluster, web: HTTPBackend
) -> None:
    import base64

    pod = await cluster.add_pod()
    for obj in service_objects("web", web.port):
        await cluster.create(obj)
    await cluster.start_operator()
    port, tls_port = free_port(), free_port()
    await cluster.create(l7route("api", port))
    await cluster.wait_condition("L7Route", "api", "Programmed")
    served = pod.served()["version"]
    cert, key = weak_certificate()
    await cluster.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/tls",
            "metadata": {"name": "weak", "namespace": "default"},
            "data": {"tls.crt": base64.b64encode(cert).decode(), "tls.key": base64.b64encode(key).decode()},
        }
    )
    route = l7route("secure", tls_port)
    route["spec"]["hostnames"] = ["weak.example.com"]  # type: ignore[index]
    route["spec"]["tls"] = {"secretName": "weak"}  # type: ignore[index]
    await cluster.create(route)
    refused = await cluster.wait_condition("L7Route", "secure", "Programmed", status="False")
    assert refused["reason"] == "Refused" and "refused the table" in refused["message"]
    assert pod.served()["version"] == served  # the pod kept its table
    assert (await asyncio.to_thread(fetch, pod.address, port, "/"))[0] == 200


async def test_unchanged_tables_are_not_pushed_and_restarts_change_nothing(
    cluster: Cluster, web: HTTPBackend
) -> None:
    pod = await cluster.add_pod()
    for obj in service_objects("web", web.port):
        await cluster.create(obj)
    await cluster.start_operator()
    port = free_port()
    await cluster.create(l7route("api", port))
    await cluster.wait_condition("L7Route", "api", "Programmed")
    operator = cluster.operator
    state = next(iter(operator.publisher.pods.values()))
    pushes, compiles, version = state.pushes, operator.loop.compiles, pod.served()["version"]
    # An unrelated Service, and our own status writes: no compile, no push.
    await cluster.create(service_objects("unrelated", 9)[0])
    await cluster.patch("L7Route", "default", "api", {"status": {"conditions": []}})
    await cluster.wait_condition("L7Route", "api", "Programmed")  # rewritten: we are the writer
    await asyncio.sleep(0.5)  # give a wrong compile the chance to happen
    assert operator.loop.compiles == compiles and state.pushes == pushes

    await cluster.stop_operator()
    await cluster.start_operator()
    restarted = cluster.operator
    await async_wait_for(lambda: restarted.latest is not None, what="the restarted operator to compile")
    await asyncio.sleep(0.5)
    assert pod.served()["version"] == version
    assert all(s.pushes == 0 for s in restarted.publisher.pods.values())  # nothing to push
    assert restarted.status.writes == 0  # status already true


async def test_a_pod_with_another_token_is_retried_not_given_up(cluster: Cluster, web: HTTPBackend) -> None:
    pod = await cluster.add_pod()
    for obj in service_objects("web", web.port):
        await cluster.create(obj)
    await cluster.start_operator(admin_token="wrong-token")
    port = free_port()
    await cluster.create(l7route("api", port))
    pending = await cluster.wait_condition("L7Route", "api", "Programmed", status="False")
    assert pending["reason"] == "NoDataplanes"  # the pod answers 401: it serves nothing we know of
    state = next(iter(cluster.operator.publisher.pods.values()))
    await async_wait_for(lambda: state.failures >= 2, what="retries")
    assert state.refused_version is None and "answered 401" in (state.error or "")
    assert pod.served()["version"] is None


async def test_pods_that_are_not_ready_are_pushed_all_the_same(cluster: Cluster, web: HTTPBackend) -> None:
    """A dataplane is Ready once it serves a table: pushing only to Ready pods meant a
    fresh pod never became Ready (first install, scale-out, every rollout)."""
    pod = await cluster.add_pod(ready=False)
    for obj in service_objects("web", web.port):
        await cluster.create(obj)
    await cluster.start_operator()
    port = free_port()
    await cluster.create(l7route("api", port))
    await cluster.wait_condition("L7Route", "api", "Programmed")
    assert (await asyncio.to_thread(fetch, pod.address, port, "/"))[0] == 200


ROUTES_IN_ROLLOUT = 40


async def test_a_rolling_update_of_the_dataplane_writes_no_status(cluster: Cluster, web: HTTPBackend) -> None:
    """Before, every object's message said "n/m dataplane pods", so each pod event rewrote
    every status (about 40,000 PATCHes for a two-pod rollout at 10,000 routes)."""
    await cluster.add_pod()
    await cluster.add_pod()
    for obj in service_objects("web", web.port):
        await cluster.create(obj)
    await cluster.start_operator()
    for i in range(ROUTES_IN_ROLLOUT):
        await cluster.create(l7route(f"r{i}", free_port()))
    for i in range(ROUTES_IN_ROLLOUT):
        await cluster.wait_condition("L7Route", f"r{i}", "Programmed")
    operator = cluster.operator
    # The emulator stores a status before its answer reaches the operator, which counts the
    # write then: wait until every write the emulator took is counted, none in flight.
    await async_wait_for(
        lambda: operator.status.writes == cluster.emulator.status_writes, what="status writes in flight"
    )
    before = operator.status.writes

    async def serving_latest(pods: list[str]) -> bool:
        latest = operator.latest
        states = operator.publisher.pods.values()
        return (
            latest is not None
            and sorted(s.pod.name for s in states) == sorted(pods)
            and all(s.acked_version == latest.table.version for s in states)
        )

    # maxSurge 1, maxUnavailable 0: a new pod, then an old one goes; twice.
    old = [p.name for p in cluster.pods]
    new: list[str] = []
    gone_so_far: list[str] = []
    for gone in old:
        new.append((await cluster.add_pod()).name)
        await async_wait_for(
            lambda: serving_latest([*[o for o in old if o not in gone_so_far], *new]), what="new pod"
        )
        await cluster.delete("Pod", NAMESPACE, gone)
        gone_so_far.append(gone)
        await async_wait_for(
            lambda: serving_latest([*[o for o in old if o not in gone_so_far], *new]), what="old pod gone"
        )
    await asyncio.sleep(0.5)  # give a status pass the chance to write
    writes = operator.status.writes - before
    print(f"\nstatus writes during a rollout of 2 pods with {ROUTES_IN_ROLLOUT} routes: {writes}")
    assert writes == 0


async def test_a_pod_that_never_answers_holds_no_status_back(cluster: Cluster, web: HTTPBackend) -> None:
    """A pod whose admin API accepts connections and never answers: before, every status
    pass waited up to 10 s for it, and it counted as a pod that had not acknowledged, so
    nothing was ever Programmed."""
    import socket

    from .operator_kit import ADMIN_PORT, LABELS, pod_address

    silent_address = pod_address(250)
    silent = socket.socket()
    silent.bind((silent_address, ADMIN_PORT))
    silent.listen(16)  # accepted by the kernel, never read
    try:
        await cluster.add_pod()
        await cluster.create(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "silent", "namespace": NAMESPACE, "uid": "uid-silent", "labels": LABELS},
                "spec": {
                    "containers": [
                        {"name": "dataplane", "ports": [{"name": "admin", "containerPort": ADMIN_PORT}]}
                    ]
                },
                "status": {
                    "phase": "Running",
                    "podIP": silent_address,
                    "conditions": [{"type": "Ready", "status": "True"}],
                },
            }
        )
        for obj in service_objects("web", web.port):
            await cluster.create(obj)
        await cluster.start_operator()
        await async_wait_for(lambda: len(cluster.operator.publisher.pods) == 2, what="both pods known")
        # The first waits out the new leader's question to every pod (3 s at most).
        for name, within in (("one", 6.0), ("two", 2.0)):
            started = asyncio.get_running_loop().time()
            await cluster.create(l7route(name, free_port()))
            await cluster.wait_condition("L7Route", name, "Programmed")
            assert asyncio.get_running_loop().time() - started < within, name
    finally:
        silent.close()


async def test_a_failed_start_closes_its_api_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the health port cannot be bound, kopf runs the startup handler again; each
    attempt made a KubeClient (two connection pools) that nothing closed."""
    import socket
    from typing import Any

    import kopf

    from controlplane import main
    from controlplane.cluster import OperatorSettings
    from controlplane.kube import Credentials, KubeClient

    made: list[KubeClient] = []

    class Recorded(KubeClient):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(main, "KubeClient", Recorded)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    settings = OperatorSettings(health_address="127.0.0.1", health_port=busy.getsockname()[1])
    registry, state = main.build_registry(
        settings, login=lambda **_: Credentials(server="http://127.0.0.1:1")
    )
    (startup,) = [h for h in registry._activities.get_all_handlers() if h.activity.value == "startup"]
    try:
        for _ in range(2):  # kopf retries a failed startup
            with pytest.raises(OSError):
                await startup.fn(settings=kopf.OperatorSettings())
    finally:
        busy.close()
    assert len(made) == 2 and all(c.session.closed and c._watch_session.closed for c in made)
    assert "operator" not in state


async def test_a_deposed_leader_stops_writing_status_at_once(cluster: Cluster, web: HTTPBackend) -> None:
    """Leadership was lost in the middle of a status pass (another replica took the
    Lease): the pass went on writing, for as long as it lasts (minutes at 10,000 routes
    and 100 writes a second), beside the new leader's writes."""
    await cluster.add_pod()
    for obj in service_objects("web", web.port):
        await cluster.create(obj)
    port = free_port()
    for i in range(100):
        await cluster.create(l7route(f"r{i}", port, f"/r{i}"))
    # A status pass of 100 writes of 1 s each, 16 at a time: some 7 s. Before, its writes
    # went on for 7.3 s after the step-down.
    cluster.emulator.write_delay["l7routes"] = 1.0
    await cluster.start_operator(leader_election=True)
    arrivals = cluster.emulator.status_arrivals
    await async_wait_for(lambda: arrivals, deadline_s=30, what="the first status writes")
    lease = resource_path("coordination.k8s.io", "v1", "leases", NAMESPACE, "bilayer-operator")
    held = await cluster.api.get(lease)
    assert held is not None and held["spec"]["holderIdentity"] == "test-operator"
    await cluster.api.patch(
        lease,
        {
            "spec": {
                "holderIdentity": "another-replica",
                "leaseTransitions": held["spec"]["leaseTransitions"] + 1,
                "renewTime": datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                # The other replica's lease, shorter than ours (15 s): the wait for it to
                # expire is only the window in which no write may come.
                "leaseDurationSeconds": 4,
            }
        },
    )
    await async_wait_for(lambda: not cluster.operator.leading, deadline_s=5, what="the step-down")
    stepped_down = time.monotonic()
    written = len(arrivals)
    cluster.emulator.write_delay.clear()  # the pass after the next take-over is quick
    # A standby until the other replica's Lease expires (4 s by our clock), then it
    # leads again and finishes.
    await async_wait_for(lambda: cluster.operator.leading, deadline_s=30, what="leading again")
    took_over = time.monotonic()
    late = [round(t - stepped_down, 2) for t in arrivals if stepped_down + 0.2 < t < took_over]
    assert not late, f"status writes {late} s after the step-down"
    assert written < 100
    for i in (0, 99):
        await cluster.wait_condition("L7Route", f"r{i}", "Programmed")


async def test_two_installs_of_two_classes_share_a_port_and_never_write_each_others_status(
    cluster: Cluster, web: HTTPBackend
) -> None:
    """Internal and external ingress on one API: each operator serves its class on the
    same port without a conflict, and no operator writes (or clears) a status of an
    object outside its class, even one that was its own until an edit."""
    internal = await cluster.sibling("internal")
    await cluster.add_pod()
    await internal.add_pod()
    for obj in service_objects("web", web.port):
        await cluster.create(obj)
    await cluster.start_operator(**cluster.operator_settings("bilayer"))
    await internal.start_operator(**internal.operator_settings("internal"))
    http, tcp = free_port(), free_port()
    nobody = {
        **l7route("nobody", http, "/nobody"),
        "spec": {**l7route("nobody", http)["spec"], "className": "nobody"},
    }
    await cluster.create(nobody)
    await cluster.create(l7route("external", http, "/external"))
    internal_route = l7route("internal", http, "/internal")
    internal_route["spec"] = {**internal_route["spec"], "className": "internal"}  # type: ignore[dict-item]
    await cluster.create(internal_route)
    await cluster.create(l4listener("external-tcp", tcp))
    internal_tcp = l4listener("internal-tcp", tcp)
    internal_tcp["spec"] = {**internal_tcp["spec"], "className": "internal"}  # type: ignore[dict-item]
    await cluster.create(internal_tcp)
    for name, kind in [("external", "L7Route"), ("internal", "L7Route")]:
        await cluster.wait_condition(kind, name, "Accepted")
        await cluster.wait_condition(kind, name, "Programmed")
    for name in ("external-tcp", "internal-tcp"):
        await cluster.wait_condition("L4Listener", name, "Programmed")
    external_pod, internal_pod = cluster.pods[0], internal.pods[0]
    for pod, path in [(external_pod, "/external"), (internal_pod, "/internal")]:
        await async_wait_for(
            lambda pod=pod, path=path: asyncio.to_thread(lambda: fetch(pod.address, http, path)[0] == 200),
            what=f"{pod.name} to serve {path}",
        )
    assert (await asyncio.to_thread(fetch, external_pod.address, http, "/internal"))[0] == 404
    assert (await asyncio.to_thread(fetch, internal_pod.address, http, "/external"))[0] == 404
    status, body = await asyncio.to_thread(fetch, internal_pod.address, tcp, "/through-internal-tcp")
    assert status == 200 and json.loads(body)["path"] == "/through-internal-tcp"
    # Each install's Service carries the ports of its own class.
    for service in ("bilayer-dataplane", "internal-dataplane"):

        async def ports(service: str = service) -> bool:
            found = await cluster.get("Service", NAMESPACE, service) or {}
            return sorted(p["port"] for p in found["spec"]["ports"]) == sorted([http, tcp])

        await async_wait_for(ports, what=f"{service} to carry both ports")
    assert (await cluster.get("L7Route", "default", "nobody") or {}).get("status") is None
    assert cluster.call(lambda: sorted(k.name for k in cluster.operator.latest.statuses)) == [
        "external",
        "external-tcp",
    ]

    # The internal route moves to a class nobody serves: the internal pod stops serving
    # it, and its status stays what the internal operator last wrote (generation 1).
    before = (await cluster.get("L7Route", "default", "internal") or {})["status"]
    await cluster.patch("L7Route", "default", "internal", {"spec": {"className": "nobody"}})
    await async_wait_for(
        # Its port closes: no route of the internal class is left on it.
        lambda: asyncio.to_thread(lambda: fetch(internal_pod.address, http, "/internal")[0] != 200),
        what="the internal pod to stop serving the moved route",
    )
    # A later object of the internal class, programmed: every status pass that could
    # have written the moved route has run by then.
    later = l7route("internal-later", http, "/later")
    later["spec"] = {**later["spec"], "className": "internal"}  # type: ignore[dict-item]
    await cluster.create(later)
    await cluster.wait_condition("L7Route", "internal-later", "Programmed")
    moved = await cluster.get("L7Route", "default", "internal") or {}
    assert moved["metadata"]["generation"] == 2 and moved["status"] == before
    assert (await cluster.get("L7Route", "default", "nobody") or {}).get("status") is None
