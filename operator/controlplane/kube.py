"""A small asynchronous Kubernetes API client: list, get, merge-patch.

kopf watches; this client does what the operator does outside kopf's handlers: the
initial listing, status patches for many objects, the dataplane Service's ports, the
leader Lease. Credentials come from kopf's login handlers (in-cluster service account,
kubeconfig, or a test emulator), so every path uses the same connection settings.
"""

from __future__ import annotations

import base64
import json
import ssl
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

MERGE_PATCH = "application/merge-patch+json"


class KubeError(Exception):
    """The API answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


@dataclass(frozen=True)
class Credentials:
    """Where the API is and how to authenticate (the fields of kopf.ConnectionInfo)."""

    server: str
    token: str | None = None
    ca_path: str | None = None
    ca_data: bytes | None = None
    insecure: bool = False
    certificate_path: str | None = None
    certificate_data: bytes | None = None
    private_key_path: str | None = None
    private_key_data: bytes | None = None

    @classmethod
    def of(cls, info: Any) -> Credentials:
        """From a kopf.ConnectionInfo."""

        def raw(value: Any) -> bytes | None:
            if value is None:
                return None
            return value if isinstance(value, bytes) else str(value).encode()

        return cls(
            server=str(info.server).rstrip("/"),
            token=info.token,
            ca_path=info.ca_path,
            ca_data=raw(info.ca_data),
            insecure=bool(info.insecure),
            certificate_path=info.certificate_path,
            certificate_data=raw(info.certificate_data),
            private_key_path=info.private_key_path,
            private_key_data=raw(info.private_key_data),
        )

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.server.startswith("https"):
            return False
        context = ssl.create_default_context()
        if self.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self.ca_path:
            context.load_verify_locations(cafile=self.ca_path)
        if self.ca_data:
            data = self.ca_data
            if b"BEGIN CERTIFICATE" not in data:
                data = base64.b64decode(data)
            context.load_verify_locations(cadata=data.decode())
        cert, key = self.certificate_path, self.private_key_path
        if self.certificate_data and self.private_key_data:
            # ssl loads client keys only from files: a private temporary directory.
            directory = Path(tempfile.mkdtemp(prefix="bilayer-kube-"))
            cert, key = str(directory / "tls.crt"), str(directory / "tls.key")
            for path, data in ((cert, self.certificate_data), (key, self.private_key_data)):
                content = data if b"BEGIN" in data else base64.b64decode(data)
                Path(path).write_bytes(content)
                Path(path).chmod(0o600)
        if cert and key:
            context.load_cert_chain(cert, key)
        return context


def resource_path(
    group: str, version: str, plural: str, namespace: str | None = None, name: str | None = None
) -> str:
    """The API path of a collection, or of one object when name is given."""
    base = f"/api/{version}" if not group else f"/apis/{group}/{version}"
    if namespace:
        base += f"/namespaces/{namespace}"
    base += f"/{plural}"
    return f"{base}/{name}" if name else base


class KubeClient:
    """Requests against the API server with the given credentials."""

    def __init__(self, credentials: Credentials, *, concurrency: int = 16) -> None:
        self.credentials = credentials
        headers = {"Accept": "application/json"}
        if credentials.token:
            headers["Authorization"] = f"Bearer {credentials.token}"
        connector = aiohttp.TCPConnector(ssl=credentials.ssl_context(), limit=concurrency)
        self.session = aiohttp.ClientSession(
            base_url=credentials.server,
            headers=headers,
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=30),
        )

    async def close(self) -> None:
        await self.session.close()

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        async with self.session.request(method, path, **kwargs) as response:
            if response.status >= 400:
                text = await response.text()
                raise KubeError(response.status, text[:500])
            return await response.json(content_type=None)

    async def list(self, path: str) -> tuple[list[dict[str, Any]], str]:
        """Every object of a collection and the list's resourceVersion."""
        body = await self._request("GET", path)
        return list(body.get("items") or []), str((body.get("metadata") or {}).get("resourceVersion", ""))

    async def get(self, path: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = await self._request("GET", path)
        except KubeError as err:
            if err.status == 404:
                return None
            raise
        return result

    async def patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self._request(
            "PATCH", path, json=body, headers={"Content-Type": MERGE_PATCH}
        )
        return result

    async def watch(
        self, path: str, resource_version: str, params: dict[str, str] | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Watch events after resource_version until the server ends the stream."""
        query = {
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            **(params or {}),
        }
        timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
        async with self.session.get(path, params=query, timeout=timeout) as response:
            if response.status >= 400:
                raise KubeError(response.status, (await response.text())[:500])
            async for line in response.content:
                if line.strip():
                    event: dict[str, Any] = json.loads(line)
                    yield event

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self._request("POST", path, json=body)
        return result
