"""Resolve TLS material into PEM, checked without touching the disk: a route's certificate
Secret, and the CA bundles (ConfigMaps or Secrets) that backends are verified against."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from dataplane import table

from ..resources.kube import TLS_SECRET_TYPE, Secret
from ..resources.l7route import CACertificateRef
from .snapshot import Object, ObjectKey, Snapshot

PEM_CERTIFICATE = "-----BEGIN CERTIFICATE-----"


class SecretIndex:
    """kubernetes.io/tls Secrets and ConfigMaps by namespace and name."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._secrets: dict[tuple[str, str], Object] = {}
        self._config_maps: dict[tuple[str, str], Object] = {}
        # (kind, namespace, name, key, content) -> (PEM, problem): a bundle is parsed once.
        self._bundles: dict[tuple[Any, ...], tuple[str | None, str | None]] = {}
        self.update([], [*snapshot.of_kind("Secret"), *snapshot.of_kind("ConfigMap")])

    def update(self, removed: Sequence[Object], added: Sequence[Object]) -> set[tuple[str, str, str]]:
        """Take Secrets and ConfigMaps away and in (other kinds are ignored); returns their
        (kind, namespace, name)."""
        affected = set()
        for obj, present in [(o, False) for o in removed] + [(o, True) for o in added]:
            key = ObjectKey.of(obj)
            if key.kind == "Secret":
                index = self._secrets
            elif key.kind == "ConfigMap":
                index = self._config_maps
            else:
                continue
            affected.add(key)
            index.pop((key.namespace, key.name), None)
            if present:
                index[key.namespace, key.name] = obj
        if affected:
            self._bundles.clear()
        return {(k.kind, k.namespace, k.name) for k in affected}

    def ca_fingerprint(self, namespace: str, refs: Sequence[CACertificateRef]) -> object:
        """Changes when what refs name does (for memo signatures)."""
        return tuple(self._data(namespace, ref) for ref in refs)

    def _data(self, namespace: str, ref: CACertificateRef) -> tuple[str | None, str | None]:
        index = self._config_maps if ref.kind == "ConfigMap" else self._secrets
        raw = index.get((namespace, ref.name))
        if raw is None:
            return None, None
        value = (raw.get("data") or {}).get(ref.key)
        return str(raw.get("type") or ""), None if value is None else str(value)

    def ca_bundle(
        self, namespace: str, refs: Sequence[CACertificateRef], where: str
    ) -> tuple[str | None, str | None]:
        """The PEM certificates of every ref, joined; or None and what is wrong (the field
        and the fix)."""
        pems = []
        for index, ref in enumerate(refs):
            field = f"{where}.caCertificateRefs[{index}]"
            kind_type, value = self._data(namespace, ref)
            memo_key = (ref.kind, namespace, ref.name, ref.key, kind_type, value)
            found = self._bundles.get(memo_key)
            if found is None:
                found = self._bundles[memo_key] = _bundle(namespace, ref, kind_type, value)
            pem, problem = found
            if problem is not None:
                return None, f"{field}: {problem}"
            assert pem is not None
            pems.append(pem)
        return "".join(pems), None

    def fingerprint(self, namespace: str, name: str) -> object:
        """Changes when the Secret's content does (for memo signatures)."""
        raw = self._secrets.get((namespace, name))
        return None if raw is None else (raw.get("type"), tuple(sorted((raw.get("data") or {}).items())))

    def certificate(
        self, namespace: str, name: str, hostnames: list[str]
    ) -> tuple[table.Certificate | None, str | None]:
        """The certificate for hostnames, or None and what is wrong with the Secret."""
        where = f"spec.tls.secretName: Secret {namespace}/{name}"
        raw = self._secrets.get((namespace, name))
        if raw is None:
            return None, f"{where} not found"
        try:
            secret = Secret.model_validate(raw)
        except ValueError:
            return None, f"{where} is malformed"
        if secret.type != TLS_SECRET_TYPE:
            return None, f"{where} has type {secret.type}; it must be {TLS_SECRET_TYPE}"
        try:
            cert_pem = base64.b64decode(secret.data.get("tls.crt", ""), validate=True)
            key_pem = base64.b64decode(secret.data.get("tls.key", ""), validate=True)
        except (binascii.Error, ValueError):
            return None, f"{where}: tls.crt and tls.key must be base64"
        problem = _check_pair(cert_pem, key_pem)
        if problem:
            return None, f"{where}: {problem}"
        return table.Certificate.build(
            hostnames=hostnames, certPem=cert_pem.decode(), keyPem=key_pem.decode()
        ), None


def _check_pair(cert_pem: bytes, key_pem: bytes) -> str | None:
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return "tls.crt holds no PEM certificate"
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        return "tls.key holds no unencrypted PEM private key"
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if cert.public_key().public_bytes(encoding, public) != key.public_key().public_bytes(encoding, public):
        return "tls.key does not belong to the certificate in tls.crt"
    return None


def _bundle(
    namespace: str, ref: CACertificateRef, kind_type: str | None, value: str | None
) -> tuple[str | None, str | None]:
    """The PEM bundle one reference names, or what is wrong with it."""
    name = f"{ref.kind} {namespace}/{ref.name}"
    if kind_type is None:
        return None, f"{name} not found; create it with the CA bundle under {ref.key}"
    if ref.kind == "Secret":
        if kind_type != TLS_SECRET_TYPE:
            return None, (
                f"{name} has type {kind_type or 'Opaque'}; the operator reads only {TLS_SECRET_TYPE} "
                "Secrets (cert-manager writes ca.crt into those): put the bundle in a ConfigMap"
            )
        if value is not None:
            try:
                value = base64.b64decode(value, validate=True).decode()
            except (binascii.Error, ValueError):
                return None, f"{name}: {ref.key} is not base64 of a PEM bundle"
    if not value:
        return None, f"{name} has no key {ref.key}; put the PEM CA bundle there or set key"
    try:
        certificates = x509.load_pem_x509_certificates(value.encode())
    except ValueError:
        return None, f"{name}: {ref.key} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
    pem = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certificates)
    return pem, None
