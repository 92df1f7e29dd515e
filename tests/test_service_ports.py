"""The dataplane Service's ports as the operator sets them: one per listener and protocol."""

from __future__ import annotations

from typing import Any

from controlplane.statuswriter import desired_ports, reconcile_service_ports, service_ports_key

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
    """The API server's answers for one Service: what get returns, what patch received."""

    def __init__(self, ports: list[dict[str, Any]]) -> None:
        self.service = {"spec": {"type": "NodePort", "ports": ports}}
        self.patches: list[dict[str, Any]] = []

    async def get(self, path: str) -> dict[str, Any]:
        return self.service

    async def patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.patches.append(body)
        return self.service


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


async def test_node_ports_are_kept_per_protocol() -> None:
    """TCP 53 and UDP 53 each keep the node port Kubernetes gave them."""
    api = FakeServices(
        [
            {"name": "tcp-53", "port": 53, "targetPort": 53, "protocol": "TCP", "nodePort": 30053},
            {"name": "udp-53", "port": 53, "targetPort": 53, "protocol": "UDP", "nodePort": 30054},
        ]
    )
    assert await reconcile_service_ports(api, "bilayer", "dataplane", mixed_table())  # type: ignore[arg-type]
    (patch,) = api.patches
    node_ports = {(p["port"], p["protocol"]): p.get("nodePort") for p in patch["spec"]["ports"]}
    assert node_ports == {(53, "TCP"): 30053, (53, "UDP"): 30054, (443, "TCP"): None, (5353, "UDP"): None}


async def test_equal_ports_are_not_patched() -> None:
    api = FakeServices(desired_ports(mixed_table()))
    assert not await reconcile_service_ports(api, "bilayer", "dataplane", mixed_table())  # type: ignore[arg-type]
    assert api.patches == []
