"""The compiler's backend protocol (appProtocol) and TLS to backends, beyond the golden cases:
the appProtocol table, and CA bundles that change under a running (incremental) compile."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from controlplane.compiler import CompileCache, Snapshot, compile_snapshot
from controlplane.compiler.upstream import speech

from .golden import inputs, render


@pytest.mark.parametrize(
    ("app_protocol", "tls", "protocol", "served"),
    [
        (None, False, "http/1.1", True),
        ("http", False, "http/1.1", True),
        ("kubernetes.io/h2c", False, "h2", True),
        ("h2c", False, "h2", True),
        ("grpc", False, "h2", True),
        ("kubernetes.io/ws", False, "http/1.1", True),
        ("kubernetes.io/wss", False, "http/1.1", False),
        ("https", False, "http/1.1", False),
        (None, True, "auto", True),
        ("https", True, "auto", True),
        ("kubernetes.io/h2c", True, "h2", True),
        ("kubernetes.io/wss", True, "http/1.1", True),
        ("kubernetes.io/ws", True, "http/1.1", True),
        ("example.com/thrift", False, "http/1.1", True),
    ],
)
def test_app_protocol_decides_what_the_proxy_speaks(
    app_protocol: str | None, tls: bool, protocol: str, served: bool
) -> None:
    said = speech(app_protocol, tls)
    assert said.protocol == protocol
    assert (said.problem is None) == served


def test_an_unknown_app_protocol_is_named_in_the_note() -> None:
    said = speech("example.com/thrift", False)
    assert said.note is not None and "'example.com/thrift'" in said.note and "HTTP/1.1" in said.note


def _tls_route() -> dict[str, Any]:
    return {
        "apiVersion": "bilayer.dev/v1alpha1",
        "kind": "L7Route",
        "metadata": {"name": "verified", "namespace": "shop"},
        "spec": {
            "port": 8080,
            "rules": [
                {
                    "backendRefs": [
                        {
                            "name": "secure",
                            "port": 443,
                            "tls": {
                                "hostname": "secure.shop.internal",
                                "caCertificateRefs": [{"name": "internal-ca"}],
                            },
                        }
                    ]
                }
            ],
        },
    }


def _compile_both(objects: list[dict[str, Any]], generation: int, cache: CompileCache) -> Any:
    compiled = compile_snapshot(Snapshot.of(objects), generation, cache)
    fresh = compile_snapshot(Snapshot.of(copy.deepcopy(objects)), generation)
    assert render(compiled) == render(fresh)
    return compiled


def test_a_ca_bundle_that_goes_and_comes_back_is_followed_incrementally() -> None:
    """The route names a ConfigMap: deleting it takes the backend out (not served
    unverified), bringing it back (with another bundle) serves it again, all without a
    compile of everything giving anything different."""
    shared = inputs("upstream-tls")  # the route objects are dropped below; the fixtures stay
    base = [o for o in shared if o["kind"] not in ("L7Route", "ConfigMap")]
    config_map = next(o for o in shared if o["kind"] == "ConfigMap")
    cache = CompileCache()
    route = _tls_route()
    first = _compile_both([*base, route, config_map], 1, cache)
    (name,) = first.table.clusters
    assert name.startswith("shop/secure:443/tls/secure.shop.internal/")
    pem = first.table.clusters[name].tls.caCertificates
    assert pem is not None and pem.startswith("-----BEGIN CERTIFICATE-----")

    gone = _compile_both([*base, route], 2, cache)
    assert gone.table.clusters == {}
    refs = gone.statuses[next(iter(gone.statuses))][1]
    assert (refs.status, refs.reason) == ("False", "InvalidCACertificateRef")
    assert "ConfigMap shop/internal-ca not found" in refs.message

    doubled = copy.deepcopy(config_map)
    doubled["data"]["ca.crt"] = config_map["data"]["ca.crt"] * 2  # a bundle of two
    back = _compile_both([*base, route, doubled], 3, cache)
    assert list(back.table.clusters) == [name]  # the name follows the settings, not the bundle
    bundle = back.table.clusters[name].tls.caCertificates
    assert bundle is not None and bundle.count("BEGIN CERTIFICATE") == 2


def test_endpoints_that_change_reach_the_tls_cluster() -> None:
    shared = inputs("upstream-tls")
    base = [o for o in shared if o["kind"] not in ("L7Route", "EndpointSlice")]
    slice_ = next(o for o in shared if o["kind"] == "EndpointSlice" and o["metadata"]["name"] == "secure-1")
    cache = CompileCache()
    first = _compile_both([*base, _tls_route(), slice_], 1, cache)
    moved = copy.deepcopy(slice_)
    moved["endpoints"] = [{"addresses": ["10.0.4.9"]}]
    second = _compile_both([*base, _tls_route(), moved], 2, cache)
    (cluster,) = second.table.clusters.values()
    assert [e.address for e in cluster.endpoints] == ["10.0.4.9"]
    assert first.table.version != second.table.version


def test_an_unchanged_tls_cluster_is_the_same_object() -> None:
    objects = inputs("upstream-tls")
    cache = CompileCache()
    first = compile_snapshot(Snapshot.of(objects), 1, cache)
    again = compile_snapshot(Snapshot.of([*objects]), 2, cache)
    assert all(again.table.clusters[n] is c for n, c in first.table.clusters.items())


def test_explain_says_how_the_proxy_talks_to_the_backend() -> None:
    from controlplane.explain import explain

    compiled = compile_snapshot(Snapshot.of(inputs("upstream-tls"))).table
    (verified,) = explain(compiled, "a.example.com", "/configmap").backends
    assert verified["protocol"] == "auto" and verified["tls"]
    assert verified["state"] == (
        "1 endpoints, HTTP/2 or HTTP/1.1 by ALPN over TLS, verified as secure.shop.internal "
        "against the route's CA bundle"
    )
    (unverified,) = explain(compiled, "b.example.com", "/").backends
    assert "not verified (insecureSkipVerify)" in unverified["state"]
    plain = compile_snapshot(Snapshot.of(inputs("upstream-app-protocol"))).table
    (h2c,) = explain(plain, "any.example.com", "/grpc/x").backends
    assert h2c["state"] == "1 endpoints, HTTP/2 cleartext (h2c)"


def test_one_service_port_with_different_tls_settings_gets_a_cluster_per_setting() -> None:
    """Clusters are keyed by namespace/service:port; TLS settings add a key of their own, so
    routes that disagree never override each other, and routes that agree (spelled with or
    without the defaults) share one cluster."""
    objects = inputs("upstream-tls")
    table = compile_snapshot(Snapshot.of(objects)).table
    secure = sorted(n for n in table.clusters if n.startswith("shop/secure:443/"))
    assert len(secure) == 3  # CA from a ConfigMap, CA from a Secret, unverified
    rules = table.listeners[8080].l7.rules  # type: ignore[union-attr]
    by_rule = {rid: rule.backends[0].cluster for rid, rule in rules.items()}
    assert by_rule["shop/verified/0"] != by_rule["shop/verified/1"] != by_rule["shop/unverified/0"]
    spelled_out = copy.deepcopy(objects)
    for obj in spelled_out:
        if obj["kind"] == "L7Route" and obj["metadata"]["name"] == "verified":
            ref = obj["spec"]["rules"][0]["backendRefs"][0]
            ref["tls"]["caCertificateRefs"] = [{"kind": "ConfigMap", "name": "internal-ca", "key": "ca.crt"}]
    again = compile_snapshot(Snapshot.of(spelled_out)).table
    assert again.clusters.keys() == table.clusters.keys()


def test_a_mirror_to_a_tls_only_port_is_left_out_and_says_why() -> None:
    route = {
        "apiVersion": "bilayer.dev/v1alpha1",
        "kind": "L7Route",
        "metadata": {"name": "mirrored", "namespace": "shop"},
        "spec": {
            "port": 8080,
            "rules": [
                {
                    "filters": [
                        {
                            "type": "RequestMirror",
                            "requestMirror": {"backendRef": {"name": "secure", "port": 443}},
                        }
                    ],
                    "backendRefs": [{"name": "grpc", "port": 50051}],
                }
            ],
        },
    }
    fixtures = [o for o in inputs("upstream-tls") if o["kind"] != "L7Route"]
    compiled = compile_snapshot(Snapshot.of([*fixtures, route]))
    (rule,) = compiled.table.listeners[8080].l7.rules.values()  # type: ignore[union-attr]
    assert rule.mirrors == []
    refs = next(iter(compiled.statuses.values()))[1]
    assert (refs.status, refs.reason) == ("False", "UnsupportedProtocol")
    assert refs.message == (
        "spec.rules[0].filters[0].requestMirror.backendRef: Service shop/secure port 443 has appProtocol "
        "https, which needs TLS: a RequestMirror cannot set tls; mirror to a plaintext port"
    )
