"""The dataplane Service's ports as the operator sets them: one per listener and protocol."""

from __future__ import annotations

from typing import Any

from controlplane.statuswriter import (
    FIELD_MANAGER,
    desired_ports,
    owned_ports,
    reconcile_service_ports,
    service_ports_key,
)

from .l4kit import objects_table, refs, services_yaml


def mixed_table() -> Any:
    """DNS on 53 over TCP and UDP, TLS passthrough on 443, UDP alone on 5353."""
    services = services_yaml({"web": [8080]}) + "\n---\n" + services_yaml({"dns": [5300]}, "UDP")
    return objects_table(
        {
            "dns-udp": {"port": 53, "protocol": "UDP", "backendRefs": refs("dns")},
            "dns-tcp": {"port": 53, "backendRefs": refs("web")},
            "tls": {"port": 443, "hostnames": ["a.example.com"], "backendRefs": refs("web")},
            "mdns": {"port": 5353, "protocol": "UDP", "backendRefs": refs("dns")},
        },
        services,
    )


class FakeServices:
    """The API server's answers for one Service: what get returns, what apply received."""

    def __init__(self, ports: list[dict[str, Any]], managed: list[dict[str, Any]] | None = None) -> None:
        self.service = {
            "metadata": {"managedFields": managed or []},
            "spec": {"type": "NodePort", "ports": ports},
        }
        self.applied: list[tuple[dict[str, Any], str]] = []

    async def get(self, path: str) -> dict[str, Any]:
        return self.service

    async def apply(self, path: str, body: dict[str, Any], field_manager: str) -> dict[str, Any]:
        self.applied.append((body, field_manager))
        return self.service


def applied_by_us(*keys: tuple[int, str]) -> list[dict[str, Any]]:
    """managedFields as the API server writes them after the operator applied these ports."""
    ports = {
        f'k:{{"port":{port},"protocol":"{protocol}"}}': {".": {}, "f:name": {}} for port, protocol in keys
    }
    return [
        {
            "manager": "helm",
            "operation": "Update",
            "fieldsV1": {"f:spec": {"f:ports": {'k:{"port":80,"protocol":"TCP"}': {}}}},
        },
        {"manager": FIELD_MANAGER, "operation": "Apply", "fieldsV1": {"f:spec": {"f:ports": ports}}},
    ]


def test_udp_ports_have_their_protocol_and_share_a_number_with_tcp() -> None:
    assert desired_ports(mixed_table()) == [
        {"name": "tcp-53", "port": 53, "targetPort": 53, "protocol": "TCP"},
        {"name": "udp-53", "port": 53, "targetPort": 53, "protocol": "UDP"},
        {"name": "tls-443", "port": 443, "targetPort": 443, "protocol": "TCP"},
        {"name": "udp-5353", "port": 5353, "targetPort": 5353, "protocol": "UDP"},
    ]


def test_the_key_changes_when_a_protocol_joins_a_port() -> None:
    """The caller skips a reconcile while the key is unchanged: adding UDP to a TCP port
    must change it (a key of port numbers and TCP kinds alone did not)."""
    tcp_only = objects_table(
        {"dns-tcp": {"port": 53, "backendRefs": refs("web")}}, services_yaml({"web": [1]})
    )
    assert service_ports_key(tcp_only) == (("tcp-53", 53, "TCP"),)
    assert ("udp-53", 53, "UDP") in service_ports_key(mixed_table())


async def test_only_the_listener_ports_are_applied_under_our_field_manager() -> None:
    """Server-side apply of the listener ports alone: the chart's port and the node ports the
    server assigned are left out, so the API server keeps them (a merge patch of the whole
    list replaced the chart's ports, and a GitOps sync put them back: a fight)."""
    chart = {"name": "http-80", "port": 80, "targetPort": 80, "protocol": "TCP", "nodePort": 30080}
    api = FakeServices(
        [
            chart,
            {"name": "tcp-53", "port": 53, "targetPort": 53, "protocol": "TCP", "nodePort": 30053},
        ]
    )
    assert await reconcile_service_ports(api, "bilayer", "dataplane", mixed_table())  # type: ignore[arg-type]
    ((body, manager),) = api.applied
    assert manager == FIELD_MANAGER == "bilayer-operator"
    assert body["apiVersion"] == "v1" and body["kind"] == "Service"
    assert body["metadata"] == {"name": "dataplane", "namespace": "bilayer"}
    assert body["spec"] == {"ports": desired_ports(mixed_table())}  # no nodePort, no port 80


async def test_a_port_the_chart_has_keeps_the_charts_name() -> None:
    """A listener on the chart's initial port: both applies name it alike, or each sync
    would rename it and the operator rename it back."""
    api = FakeServices([{"name": "http-80", "port": 80, "targetPort": 80, "protocol": "TCP"}])
    table = objects_table({"edge": {"port": 80, "backendRefs": refs("web")}}, services_yaml({"web": [1]}))
    assert await reconcile_service_ports(api, "bilayer", "dataplane", table)  # type: ignore[arg-type]
    ((body, _),) = api.applied
    assert body["spec"]["ports"] == [{"name": "http-80", "port": 80, "targetPort": 80, "protocol": "TCP"}]


def test_owned_ports_come_from_our_apply_entry_only() -> None:
    service = {"metadata": {"managedFields": applied_by_us((53, "TCP"), (53, "UDP"))}}
    assert owned_ports(service) == {(53, "TCP"), (53, "UDP")}  # not helm's port 80
    assert owned_ports({"metadata": {}}) == set()


async def test_ports_we_own_and_the_service_has_are_not_applied_again() -> None:
    desired = desired_ports(mixed_table())
    keys = [(p["port"], p["protocol"]) for p in desired]
    chart = {"name": "http-80", "port": 80, "targetPort": 80, "protocol": "TCP"}
    api = FakeServices([chart, *desired], applied_by_us(*keys))
    assert not await reconcile_service_ports(api, "bilayer", "dataplane", mixed_table())  # type: ignore[arg-type]
    assert api.applied == []
    # One listener fewer: applied again, without it (the API server then drops it).
    api = FakeServices([chart, *desired], applied_by_us(*keys, (8443, "TCP")))
    assert await reconcile_service_ports(api, "bilayer", "dataplane", mixed_table())  # type: ignore[arg-type]


async def test_no_listeners_releases_our_ports_and_sends_none() -> None:
    api = FakeServices(
        [{"name": "tcp-53", "port": 53, "targetPort": 53, "protocol": "TCP"}], applied_by_us((53, "TCP"))
    )
    empty = objects_table({}, services_yaml({"web": [1]}))
    assert await reconcile_service_ports(api, "bilayer", "dataplane", empty)  # type: ignore[arg-type]
    ((body, _),) = api.applied
    assert "spec" not in body
