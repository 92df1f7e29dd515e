"""The release workflow cannot run here; this checks what it would do: on a v* tag only,
a multi-arch build pushed to ghcr.io, from the repository's Dockerfile."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "release.yaml"


def _workflow() -> dict[Any, Any]:
    loaded = yaml.safe_load(WORKFLOW.read_text())
    assert isinstance(loaded, dict)
    return loaded


def _steps() -> list[dict[str, Any]]:
    (job,) = _workflow()["jobs"].values()
    steps: list[dict[str, Any]] = job["steps"]
    return steps


def test_it_runs_on_version_tags_only() -> None:
    workflow = _workflow()
    # YAML 1.1 reads the key `on` as True.
    trigger = workflow.get("on", workflow.get(True))
    assert trigger == {"push": {"tags": ["v*"]}}
    assert workflow["permissions"]["packages"] == "write"


def test_it_builds_for_amd64_and_arm64_and_pushes_to_ghcr() -> None:
    steps = _steps()
    uses = [s.get("uses", "").split("@")[0] for s in steps]
    # QEMU and Buildx before the build: without them only the runner's own platform builds.
    build = uses.index("docker/build-push-action")
    assert uses.index("docker/setup-qemu-action") < build
    assert uses.index("docker/setup-buildx-action") < build
    login = steps[uses.index("docker/login-action")]["with"]
    assert login["registry"] == "ghcr.io"
    options = steps[build]["with"]
    assert set(options["platforms"].split(",")) == {"linux/amd64", "linux/arm64"}
    assert options["push"] is True and options["context"] == "."
    assert (ROOT / "Dockerfile").exists()
    meta = steps[uses.index("docker/metadata-action")]["with"]
    assert meta["images"].startswith("ghcr.io/")
    assert "type=semver" in meta["tags"]
