"""Resolve a route's TLS Secret into PEM material, checked without touching the disk."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from dataplane import table

from ..resources.kube import TLS_SECRET_TYPE, Secret
from .snapshot import Object, ObjectKey, Snapshot


class SecretIndex:
    """kubernetes.io/tls Secrets by namespace and name."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._secrets: dict[tuple[str, str], Object] = {}
        self.update([], snapshot.of_kind("Secret"))

    def update(self, removed: Sequence[Object], added: Sequence[Object]) -> set[tuple[str, str]]:
        """Take Secrets away and in (other kinds are ignored); returns their names."""
        affected = set()
        for obj, present in [(o, False) for o in removed] + [(o, True) for o in added]:
            key = ObjectKey.of(obj)
            if key.kind != "Secret":
                continue
            affected.add((key.namespace, key.name))
            self._secrets.pop((key.namespace, key.name), None)
            if present:
                self._secrets[key.namespace, key.name] = obj
        return affected

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
