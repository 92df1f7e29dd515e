"""The operator's store: which events can change the table."""

from __future__ import annotations

from controlplane.store import Store

from .helpers import load_yaml

ROUTE = """
apiVersion: bilayer.dev/v1alpha1
kind: L7Route
metadata: {name: api, namespace: shop, generation: 1}
spec:
  port: 8080
  tls: {secretName: cert}
  rules: [{backendRefs: [{name: web, port: 80}]}]
"""


def body(kind: str, name: str, namespace: str = "shop", **extra: object) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": kind, "metadata": {"name": name, "namespace": namespace}, **extra}


def test_status_only_changes_do_not_matter() -> None:
    store = Store()
    route = load_yaml(ROUTE)[0]
    assert store.apply("L7Route", "ADDED", route)
    assert not store.apply("L7Route", "MODIFIED", {**route, "status": {"conditions": [{"type": "Accepted"}]}})
    changed = {**route, "metadata": {**route["metadata"], "generation": 2}}
    assert store.apply("L7Route", "MODIFIED", changed)


def test_a_status_update_keeps_the_object_the_compiler_knows() -> None:
    """The compiler reuses its work for objects that are the same dict as last time: a
    status write coming back (a new resourceVersion) must not make every object new."""
    store = Store()
    route = load_yaml(ROUTE)[0]
    store.apply("L7Route", "ADDED", route)
    (known,) = store.snapshot().objects
    echo = {**route, "metadata": {**route["metadata"], "resourceVersion": "7"}, "status": {"conditions": []}}
    assert not store.apply("L7Route", "MODIFIED", echo)
    (now,) = store.snapshot().objects
    assert now is known
    assert now["metadata"]["resourceVersion"] == "7" and now["status"] == {"conditions": []}


def test_only_referenced_services_slices_and_tls_secrets_matter() -> None:
    store = Store()
    assert not store.apply("Service", "ADDED", body("Service", "web"))  # no route names it yet
    store.apply("L7Route", "ADDED", load_yaml(ROUTE)[0])
    assert store.apply("Service", "MODIFIED", body("Service", "web", spec={"ports": [{"port": 80}]}))
    assert not store.apply("Service", "ADDED", body("Service", "other"))
    assert not store.apply("Service", "ADDED", body("Service", "web", namespace="elsewhere"))
    labels = {"kubernetes.io/service-name": "web"}
    slice_ = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "shop", "labels": labels},
        "endpoints": [],
    }
    assert store.apply("EndpointSlice", "ADDED", slice_)
    tls = body("Secret", "cert", type="kubernetes.io/tls", data={"tls.crt": "x", "tls.key": "y"})
    assert store.apply("Secret", "ADDED", tls)
    assert not store.apply("Secret", "ADDED", body("Secret", "password", type="Opaque", data={"p": "x"}))
    assert not any(k.name == "password" for k in store.objects)  # not even kept


def test_references_follow_route_changes_and_deletions() -> None:
    store = Store()
    route = load_yaml(ROUTE)[0]
    store.apply("L7Route", "ADDED", route)
    store.apply("L7Route", "DELETED", route)
    assert not store.apply("Service", "ADDED", body("Service", "web"))
    store.replace_all("L7Route", [route])
    assert store.apply("Service", "MODIFIED", body("Service", "web", spec={"ports": []}))


def test_a_late_echo_of_an_earlier_status_write_is_not_news() -> None:
    """The watch event of write N can arrive after the answer to write N+1: its status is
    stale and must not replace the newer one (the operator then wrote the newer again)."""
    store = Store()
    route = load_yaml(ROUTE)[0]
    route["metadata"]["resourceVersion"] = "5"
    store.apply("L7Route", "ADDED", route)
    (key,) = store.objects
    store.objects[key]["status"] = {"conditions": [{"type": "Programmed", "status": "True"}]}
    store.objects[key]["metadata"] = {
        **store.objects[key]["metadata"],
        "resourceVersion": "9",
    }  # our write's answer
    late = {**route, "metadata": {**route["metadata"], "resourceVersion": "7"}, "status": {"conditions": []}}
    assert not store.apply("L7Route", "MODIFIED", late)
    assert store.status_of(key) == [{"type": "Programmed", "status": "True"}]
    # A spec change that is older than our write still counts (its status does not).
    changed = {**late, "metadata": {**late["metadata"], "generation": 2}}
    assert store.apply("L7Route", "MODIFIED", changed)
    assert store.status_of(key) == [{"type": "Programmed", "status": "True"}]


def test_references_of_deleted_routes_leave_no_entries_behind() -> None:
    """Counter.subtract keeps keys at zero: a cluster with route churn grew an entry per
    Service and Secret ever named, for as long as the operator ran."""
    store = Store()
    route = load_yaml(ROUTE)[0]
    store.apply("L7Route", "ADDED", route)
    store.apply("L7Route", "DELETED", route)
    assert not store._services and not store._secrets
    store.apply("L7Route", "ADDED", route)
    moved = {**route, "spec": {**route["spec"], "tls": {"secretName": "other"}}}
    store.apply("L7Route", "MODIFIED", moved)
    assert dict(store._secrets) == {("Secret", "shop", "other"): 1}


CA_ROUTE = """
apiVersion: bilayer.dev/v1alpha1
kind: L7Route
metadata: {name: api, namespace: shop, generation: 1}
spec:
  port: 8080
  rules:
  - backendRefs:
    - name: web
      port: 443
      tls:
        hostname: web.shop.internal
        caCertificateRefs: [{name: web-ca}, {kind: Secret, name: web-ca-tls}]
"""
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def test_ca_bundles_that_routes_name_matter_and_config_maps_keep_only_certificates() -> None:
    store = Store()
    store.apply("L7Route", "ADDED", load_yaml(CA_ROUTE)[0])
    named = body("ConfigMap", "web-ca", data={"ca.crt": PEM, "app.properties": "password=hunter2"})
    assert store.apply("ConfigMap", "ADDED", named)
    (kept,) = [o for o in store.snapshot().objects if o["kind"] == "ConfigMap"]
    assert kept["data"] == {"ca.crt": PEM}  # what holds no certificate is not kept
    assert not store.apply("ConfigMap", "ADDED", body("ConfigMap", "unrelated", data={"ca.crt": PEM}))
    tls_secret = body("Secret", "web-ca-tls", type="kubernetes.io/tls", data={"ca.crt": "eA=="})
    assert store.apply("Secret", "ADDED", tls_secret)
    assert store.apply("ConfigMap", "DELETED", named)
    store.apply("L7Route", "DELETED", load_yaml(CA_ROUTE)[0])
    assert not store._secrets
