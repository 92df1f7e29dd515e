"""The dataplanes' admin token, kept in a Secret the operator fills at its first start.

The chart renders that Secret without data, so two renders of the chart are identical
(GitOps tools cannot run Helm's `lookup`, and a token generated per render would change
on every sync). The first operator to start writes a random token into it; the dataplane
pods, whose environment reads the Secret, start once it is there. Writers neither of the
chart nor of GitOps ever set `data`, so none of them reverts it.
"""

from __future__ import annotations

import base64
import logging
import secrets

from dataplane.logs import fields

from .kube import KubeClient, KubeError, resource_path

log = logging.getLogger("bilayer.operator")

KEY = "token"
ATTEMPTS = 5


async def ensure_token(client: KubeClient, namespace: str, name: str) -> str:
    """The token in Secret namespace/name; writes a new random one when it holds none."""
    path = resource_path("", "v1", "secrets", namespace, name)
    for _ in range(ATTEMPTS):
        secret = await client.get(path)
        if secret is None:
            raise KubeError(404, f"Secret {namespace}/{name} for the admin token not found")
        held = (secret.get("data") or {}).get(KEY)
        if held:
            token = base64.b64decode(held).decode().strip()
            if token:
                return token
        token = secrets.token_urlsafe(36)
        # The resourceVersion makes the write conditional: when two replicas start at once,
        # the second one's write fails with 409 and it reads the first one's token.
        body = {
            "metadata": {"resourceVersion": secret["metadata"]["resourceVersion"]},
            "data": {KEY: base64.b64encode(token.encode()).decode()},
        }
        try:
            await client.patch(path, body)
        except KubeError as err:
            if err.status != 409:
                raise
            continue
        log.info("admin token generated", extra=fields(secret=f"{namespace}/{name}"))
        return token
    raise KubeError(409, f"Secret {namespace}/{name} kept changing while the admin token was written")
