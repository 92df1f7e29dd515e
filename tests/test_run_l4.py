"""UDP, TLS passthrough and per-client limits from `bilayer run -f DIR` (a real process):
DNS over UDP and TCP on one port number to dnsmasq, two TLS backends behind one port."""

from __future__ import annotations

import asyncio
from pathlib import Path

import dns.asyncquery
import trustme

from .helpers import BilayerRun, free_port, wait_for
from .tlskit import TLSBackend
from .udpkit import Dnsmasq, free_udp_port, name_of, query, whoami

SERVICES = """
apiVersion: v1
kind: Service
metadata: {{name: dns, namespace: demo}}
spec:
  ports:
  - {{name: dns, port: 53, targetPort: dns, protocol: UDP}}
  - {{name: dns-tcp, port: 53, targetPort: dns-tcp, protocol: TCP}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: dns-1, namespace: demo, labels: {{kubernetes.io/service-name: dns}}}}
addressType: IPv4
ports: [{{name: dns, port: {dns}, protocol: UDP}}, {{name: dns-tcp, port: {dns}, protocol: TCP}}]
endpoints: [{{addresses: [127.0.0.1]}}]
"""

TLS_SERVICE = """
---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: demo}}
spec:
  ports: [{{name: tls, port: 443, targetPort: tls}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: demo, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{name: tls, port: {port}}}]
endpoints: [{{addresses: [127.0.0.1]}}]
"""

LISTENERS = """
apiVersion: bilayer.dev/v1alpha1
kind: L4Listener
metadata: {{name: dns-udp, namespace: demo}}
spec:
  port: {dns_port}
  protocol: UDP
  backendRefs: [{{name: dns, port: 53}}]
  healthCheck: {{interval: 1s}}
  limits: {{perClient: {{maxConnections: 100}}}}
---
apiVersion: bilayer.dev/v1alpha1
kind: L4Listener
metadata: {{name: dns-tcp, namespace: demo}}
spec:
  port: {dns_port}
  backendRefs: [{{name: dns, port: 53}}]
---
apiVersion: bilayer.dev/v1alpha1
kind: L4Listener
metadata: {{name: site-a, namespace: demo}}
spec:
  port: {tls_port}
  hostnames: [a.example.com]
  backendRefs: [{{name: a, port: 443}}]
  limits: {{perClient: {{maxConnections: 50, connectionRate: {{connections: 100}}}}}}
---
apiVersion: bilayer.dev/v1alpha1
kind: L4Listener
metadata: {{name: site-b, namespace: demo}}
spec:
  port: {tls_port}
  hostnames: ["*.b.example.com"]
  backendRefs: [{{name: b, port: 443}}]
"""


async def tls_said(port: int, ca: trustme.CA, name: str) -> str:
    import ssl

    context = ssl.create_default_context()
    ca.configure_trust(context)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=name)
    said = (await asyncio.wait_for(reader.readline(), 10)).decode().strip()
    writer.close()
    return said


async def test_udp_passthrough_and_limits_from_files(tmp_path: Path) -> None:
    ca = trustme.CA()
    dnsmasq = Dnsmasq("dns").start()
    a = await TLSBackend("a", ca.issue_cert("a.example.com")).start()
    b = await TLSBackend("b", ca.issue_cert("*.b.example.com")).start()
    dns_port, tls_port = free_udp_port(), free_port()
    services = SERVICES.format(dns=dnsmasq.port)
    services += TLS_SERVICE.format(name="a", port=a.port) + TLS_SERVICE.format(name="b", port=b.port)
    (tmp_path / "services.yaml").write_text(services)
    (tmp_path / "listeners.yaml").write_text(LISTENERS.format(dns_port=dns_port, tls_port=tls_port))
    run = BilayerRun(str(tmp_path))
    try:
        for name in ("dns-udp", "dns-tcp", "site-a", "site-b"):
            conditions = run.conditions("L4Listener", name)
            assert conditions["Accepted"]["status"] == "True", conditions
            assert conditions["ResolvedRefs"]["status"] == "True", conditions
        assert (
            run.conditions("L4Listener", "dns-udp")["Accepted"]["message"]
            == f"serving UDP on port {dns_port}"
        )
        listeners = run.get("/v1/table")[1]["listeners"]
        assert listeners[str(dns_port)]["kind"] == "l4+udp"
        assert listeners[str(tls_port)]["kind"] == "l4"
        assert await whoami(dns_port) == "dns"  # UDP
        over_tcp = await dns.asyncquery.tcp(query(), "127.0.0.1", port=dns_port, timeout=5)
        assert name_of(over_tcp) == "dns"  # TCP on the same port number
        assert await tls_said(tls_port, ca, "a.example.com") == "hello from a"
        assert await tls_said(tls_port, ca, "www.b.example.com") == "hello from b"
        metrics = run.get("/metrics")[1]
        assert (
            f'bilayer_udp_sessions_created_total{{listener="demo/dns-udp",port="{dns_port}"}} 1.0' in metrics
        )
        assert f'bilayer_listener_up{{kind="udp",port="{dns_port}"}} 1.0' in metrics
        # An invalid listener is reported, naming the field; everything else keeps serving.
        (tmp_path / "bad.yaml").write_text(
            "apiVersion: bilayer.dev/v1alpha1\nkind: L4Listener\nmetadata: {name: bad, namespace: demo}\n"
            f"spec: {{port: {dns_port + 1}, protocol: UDP, proxyProtocol: V1,\n"
            "  backendRefs: [{name: dns, port: 53}]}\n"
        )
        bad = wait_for(lambda: run.conditions("L4Listener", "bad"), what="the bad listener's status")
        assert bad["Accepted"]["status"] == "False" and "proxyProtocol" in bad["Accepted"]["message"]
        assert await whoami(dns_port) == "dns"
        assert await tls_said(tls_port, ca, "a.example.com") == "hello from a"
    finally:
        # In a thread: the TLS backends live in this loop and must see their clients go.
        assert await asyncio.to_thread(run.stop) == 0, run.output()
        dnsmasq.stop()
        await a.stop()
        await b.stop()


def test_a_udp_port_taken_fails_only_the_udp_listener(tmp_path: Path) -> None:
    """Another process holds the UDP port: the UDP listener is ListenerFailed, the TCP
    listener on the same port number and a passthrough port are programmed."""
    import socket

    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", 0))
    dns_port = taken.getsockname()[1]
    tls_port = free_port()
    services = SERVICES.format(dns=1053) + TLS_SERVICE.format(name="a", port=1443)
    services += TLS_SERVICE.format(name="b", port=1444)
    (tmp_path / "services.yaml").write_text(services)
    (tmp_path / "listeners.yaml").write_text(LISTENERS.format(dns_port=dns_port, tls_port=tls_port))
    run = BilayerRun(str(tmp_path))
    try:
        failed = run.conditions("L4Listener", "dns-udp")["Programmed"]
        assert failed["status"] == "False" and failed["reason"] == "ListenerFailed", failed
        assert f"cannot listen on udp 127.0.0.1:{dns_port}" in failed["message"]
        for name in ("dns-tcp", "site-a", "site-b"):
            assert run.conditions("L4Listener", name)["Programmed"]["status"] == "True", name
    finally:
        run.stop()
        taken.close()
