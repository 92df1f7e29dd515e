"""A small asynchronous Kubernetes API client: list (paginated), watch, get, patch, create.

The operator's whole conversation with the API server goes through here, so that every
call shares the same rules:
- a client-side rate limit (a token bucket, like client-go's) for everything but watches;
- 429 and 5xx answers and dropped connections are retried with a bounded backoff, and a
  `Retry-After` is honoured (capped): the first LIST of a custom resource right after its
  CRD is created answers 429 "storage is (re)initializing";
- a 401 re-reads the token file (the kubelet rotates projected service-account tokens;
  bound tokens expire after about an hour) and the call is tried once more;
- every call has a deadline, every watch line and answer a size limit.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import random
import ssl
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from dataplane.logs import fields

log = logging.getLogger("bilayer.kube")

MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"  # server-side apply; JSON is YAML
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# The API server stores objects of up to 1.5 MiB; a watch event or list page is JSON
# around them. Anything larger is not an answer we can use.
MAX_EVENT_BYTES = 8 * 1024 * 1024
MAX_ANSWER_BYTES = 64 * 1024 * 1024
LIST_PAGE = 500  # objects per LIST page (limit/continue), as client-go's pager does
REQUEST_TIMEOUT = 30.0
RETRIES = 5  # attempts after the first, for 429, 5xx and dropped connections
BACKOFF_BASE = 0.2
BACKOFF_MAX = 10.0
RETRY_AFTER_MAX = 30.0
RETRY_AFTER_MIN = 0.2  # a "Retry-After: 0" would retry at once, in a loop
TOKEN_RECHECK = 60.0  # seconds: a token file is read again at least this often


class KubeError(Exception):
    """The API answered with an error status."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.retry_after = retry_after  # seconds the server asked us to wait (429, 503)


class Gone(KubeError):
    """410: the resourceVersion asked for is too old; list again."""


TRANSIENT = (aiohttp.ClientError, TimeoutError, OSError)


@dataclass(frozen=True)
class Credentials:
    """Where the API is and how to authenticate (the fields of kopf.ConnectionInfo)."""

    server: str
    # Secrets stay out of the repr: a repr reaches logs.
    token: str | None = field(default=None, repr=False)
    token_file: str | None = None  # read again on 401 and every minute
    ca_path: str | None = None
    ca_data: bytes | None = None
    insecure: bool = False
    certificate_path: str | None = None
    certificate_data: bytes | None = None
    private_key_path: str | None = None
    private_key_data: bytes | None = field(default=None, repr=False)
    default_namespace: str | None = None

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

    @classmethod
    def in_cluster(cls, folder: Path = SERVICE_ACCOUNT) -> Credentials | None:
        """The pod's service account: the projected token file, which the kubelet rotates."""
        token = folder / "token"
        if not token.exists():
            return None
        host = os.environ.get("KUBERNETES_SERVICE_HOST", "kubernetes.default.svc")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        host = f"[{host}]" if ":" in host else host
        namespace = folder / "namespace"
        return cls(
            server=f"https://{host}:{port}",
            token=token.read_text().strip() or None,
            token_file=str(token),
            ca_path=str(folder / "ca.crt") if (folder / "ca.crt").exists() else None,
            default_namespace=namespace.read_text().strip() if namespace.exists() else None,
        )

    @classmethod
    def from_kubeconfig(cls, path: str | None = None) -> Credentials | None:
        """The current context of $KUBECONFIG (or ~/.kube/config), `tokenFile` included."""
        path = path or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or None
        path = path or os.path.expanduser("~/.kube/config")
        if not os.path.exists(path):
            return None
        config = yaml.safe_load(Path(path).read_text()) or {}

        def named(section: str, name: str) -> dict[str, Any]:
            for item in config.get(section) or []:
                if item.get("name") == name:
                    found: dict[str, Any] = item.get(section[:-1]) or {}
                    return found
            raise ValueError(f"{path}: no {section[:-1]} named {name!r}")

        context = named("contexts", config.get("current-context") or "")
        cluster = named("clusters", context.get("cluster") or "")
        user = named("users", context.get("user") or "")
        token_file = user.get("tokenFile")
        token = user.get("token")
        if token_file and not token:
            token = Path(token_file).read_text().strip()

        def data(key: str) -> bytes | None:
            value = cluster.get(key) if key.startswith("certificate-authority") else user.get(key)
            return base64.b64decode(value) if value else None

        return cls(
            server=str(cluster["server"]).rstrip("/"),
            token=token,
            token_file=token_file,
            ca_path=cluster.get("certificate-authority"),
            ca_data=data("certificate-authority-data"),
            insecure=bool(cluster.get("insecure-skip-tls-verify")),
            certificate_path=user.get("client-certificate"),
            certificate_data=data("client-certificate-data"),
            private_key_path=user.get("client-key"),
            private_key_data=data("client-key-data"),
            default_namespace=context.get("namespace"),
        )

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.server.startswith("https"):
            return False
        if self.ca_path or self.ca_data:
            # The cluster's CA is the one authority for its API server: not also every CA
            # the system trusts (any of them could then vouch for "kubernetes.default.svc").
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        else:
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


class RateLimiter:
    """A token bucket: `qps` requests a second on average, bursts of up to `burst`."""

    def __init__(self, qps: float, burst: int) -> None:
        self.qps = qps
        self.burst = burst
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._lock = asyncio.Lock()
        self.waited = 0.0  # seconds callers spent waiting, for metrics

    async def take(self) -> None:
        if self.qps <= 0:
            return
        async with self._lock:  # one waiter at a time keeps the order fair
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.qps)
            self._last = now
            if self._tokens < 1:
                wait = (1 - self._tokens) / self.qps
                self.waited += wait
                await asyncio.sleep(wait)
                self._tokens, self._last = 1.0, time.monotonic()
            self._tokens -= 1


def _retry_after(response: aiohttp.ClientResponse) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return min(RETRY_AFTER_MAX, max(RETRY_AFTER_MIN, float(value))) if value else None
    except ValueError:
        return None


def backoff(attempt: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_MAX) -> float:
    """Capped exponential backoff with jitter (half to all of the step)."""
    step = min(cap, base * 2 ** min(attempt, 16))
    return random.uniform(step / 2, step)


class KubeClient:
    """Requests against the API server with the given credentials."""

    def __init__(
        self,
        credentials: Credentials,
        *,
        qps: float = 50.0,
        burst: int = 100,
        concurrency: int = 32,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.credentials = credentials
        self._token = credentials.token
        self._token_read = time.monotonic()
        self.limiter = RateLimiter(qps, burst)
        self.timeout = timeout
        self.requests = 0
        self.retries = 0  # answers retried (429, 5xx, dropped connections)
        self.throttled = 0  # 429 answers
        self.token_reloads = 0
        # Watches hold a connection each for minutes: their own pool, so they never
        # starve requests (and requests never delay a watch).
        ssl_context = credentials.ssl_context()
        self.session = aiohttp.ClientSession(
            base_url=credentials.server,
            headers={"Accept": "application/json", "User-Agent": "bilayer-operator"},
            connector=aiohttp.TCPConnector(ssl=ssl_context, limit=concurrency),
        )
        self._watch_session = aiohttp.ClientSession(
            base_url=credentials.server,
            headers={"Accept": "application/json", "User-Agent": "bilayer-operator"},
            connector=aiohttp.TCPConnector(ssl=ssl_context, limit=0),
        )

    async def close(self) -> None:
        await self.session.close()
        await self._watch_session.close()

    # --- credentials ---

    def _auth(self) -> dict[str, str]:
        if self.credentials.token_file and time.monotonic() - self._token_read > TOKEN_RECHECK:
            self._reload_token()
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def _reload_token(self) -> bool:
        """Read the token file again; True when the token changed."""
        self._token_read = time.monotonic()
        path = self.credentials.token_file
        if not path:
            return False
        try:
            token = Path(path).read_text().strip()
        except OSError as err:
            log.warning("cannot read the token file", extra=fields(path=path, error=str(err)))
            return False
        changed = bool(token) and token != self._token
        if changed:
            self._token = token
            self.token_reloads += 1
            log.info("service-account token reloaded", extra=fields(path=path))
        return changed

    # --- requests ---

    async def _request(
        self, method: str, path: str, *, params: dict[str, str] | None = None, **kwargs: Any
    ) -> Any:
        """One API call: rate-limited, retried where that is safe, its answer bounded."""
        # Made once: every attempt sends the same headers (taken from kwargs per attempt,
        # a retry after a dropped connection went without its Content-Type: 415).
        extra: dict[str, str] = kwargs.pop("headers", None) or {}
        reauthenticated = False
        attempt = 0
        while True:
            await self.limiter.take()
            self.requests += 1
            wait: float | None = None
            try:
                headers = {**extra, **self._auth()}
                async with self.session.request(
                    method,
                    path,
                    params=params,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=self.timeout),
                    **kwargs,
                ) as response:
                    if response.status == 401 and not reauthenticated and self._reload_token():
                        reauthenticated = True
                        continue
                    if response.status == 429 or response.status >= 500:
                        self.throttled += response.status == 429
                        wait = _retry_after(response)
                        if attempt >= RETRIES:
                            # With the server's wait: an informer waits that long before it
                            # lists or watches again.
                            raise KubeError(response.status, await _text(response), wait)
                    elif response.status >= 400:
                        raise (Gone if response.status == 410 else KubeError)(
                            response.status, await _text(response)
                        )
                    else:
                        body = await _bounded(response, MAX_ANSWER_BYTES)
                        return json.loads(body) if body else {}
            except TRANSIENT as err:
                if attempt >= RETRIES:
                    raise
                log.info("API call failed; retrying", extra=fields(method=method, path=path, error=repr(err)))
            self.retries += 1
            await asyncio.sleep(wait if wait is not None else backoff(attempt))
            attempt += 1

    async def list(
        self, path: str, params: dict[str, str] | None = None, *, page: int = LIST_PAGE
    ) -> tuple[list[dict[str, Any]], str]:
        """Every object of a collection (fetched in pages) and the list's resourceVersion."""
        items: list[dict[str, Any]] = []
        query = {**(params or {}), "limit": str(page)}
        while True:
            body = await self._request("GET", path, params=query)
            items += body.get("items") or []
            meta = body.get("metadata") or {}
            version = str(meta.get("resourceVersion", ""))
            token = meta.get("continue")
            if not token:
                return items, version
            query["continue"] = token

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
            "PATCH", path, data=json.dumps(body), headers={"Content-Type": MERGE_PATCH}
        )
        return result

    async def apply(self, path: str, body: dict[str, Any], field_manager: str) -> dict[str, Any]:
        """Server-side apply: body is every field this manager owns in the object; fields it
        owned before and leaves out are released (removed unless another manager owns them).
        Forced: a conflict with another manager's value is resolved in our favour."""
        result: dict[str, Any] = await self._request(
            "PATCH",
            path,
            params={"fieldManager": field_manager, "force": "true"},
            data=json.dumps(body),
            headers={"Content-Type": APPLY_PATCH},
        )
        return result

    async def update(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """PUT: replaces the object; 409 when its resourceVersion is not the current one."""
        result: dict[str, Any] = await self._request(
            "PUT", path, data=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        return result

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self._request(
            "POST", path, data=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        return result

    async def delete(self, path: str) -> None:
        try:
            await self._request("DELETE", path)
        except KubeError as err:
            if err.status != 404:
                raise

    async def watch(
        self,
        path: str,
        resource_version: str,
        params: dict[str, str] | None = None,
        *,
        timeout: int = 300,  # noqa: ASYNC109
    ) -> AsyncIterator[dict[str, Any]]:
        """Watch events after resource_version until the server ends the stream (after
        about `timeout` seconds). Raises Gone for 410, KubeError for other errors."""
        query = {
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout),
            **(params or {}),
        }
        # Bookmarks come about every minute; a stream silent for longer is dead.
        limits = aiohttp.ClientTimeout(total=timeout + 60, sock_connect=10, sock_read=90)
        for attempt in range(2):
            async with self._watch_session.get(
                path, params=query, timeout=limits, headers=self._auth()
            ) as response:
                if response.status == 401 and attempt == 0 and self._reload_token():
                    continue
                if response.status >= 400:
                    if response.status == 410:
                        raise Gone(410, await _text(response))
                    raise KubeError(response.status, await _text(response), _retry_after(response))
                async for line in _lines(response.content, MAX_EVENT_BYTES):
                    event: dict[str, Any] = json.loads(line)
                    yield event
                return


async def _text(response: aiohttp.ClientResponse) -> str:
    return (await response.content.read(2000)).decode("utf-8", "replace")


async def _bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(256 * 1024):
        size += len(chunk)
        if size > limit:
            raise KubeError(response.status, f"answer larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _lines(content: aiohttp.StreamReader, limit: int) -> AsyncIterator[bytes]:
    """Lines of a watch stream, each at most limit bytes (aiohttp's own line reader stops
    at 128 KiB, less than one big Secret)."""
    buffer = b""
    async for chunk in content.iter_any():
        buffer += chunk
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            line = buffer[start:end]
            start = end + 1
            if line.strip():
                yield line
        buffer = buffer[start:]
        if len(buffer) > limit:
            raise KubeError(200, f"watch event larger than {limit} bytes")
    if buffer.strip():
        yield buffer
