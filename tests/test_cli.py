"""The bilayer command: validate, compile, explain, crds, --help."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from controlplane.cli import main

from .golden import GOLDEN

ROOT = Path(__file__).parent.parent


def golden_dir(tmp_path: Path, *cases: str) -> Path:
    for case in cases:
        shutil.copy(GOLDEN / f"{case}.in.yaml", tmp_path / f"{case}.yaml")
    shutil.copy(GOLDEN / "_backends.yaml", tmp_path / "backends.yaml")
    shutil.copy(GOLDEN / "_secrets.yaml", tmp_path / "secrets.yaml")
    return tmp_path


def test_validate_ok_on_the_quick_start(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "-f", str(ROOT / "examples/quickstart")]) == 0
    assert capsys.readouterr().out.startswith("ok: 2 objects valid")


def test_validate_names_object_field_and_allowed_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = golden_dir(tmp_path, "invalid-l4-port", "invalid-hostname", "l4-backend-not-found")
    assert main(["validate", "-f", str(folder)]) == 1
    out = capsys.readouterr().out.splitlines()
    expected = "spec.port: Input should be less than or equal to 65535 (got 70000)"
    assert f"error: L4Listener shop/bad: Accepted Invalid: {expected}" in out
    assert any(line.startswith("error: L7Route shop/loud") and "spec.hostnames[0]" in line for line in out)
    assert any(
        line.startswith("warning: L4Listener shop/redis: ResolvedRefs BackendNotFound") for line in out
    )


def test_validate_strict_fails_on_warnings(tmp_path: Path) -> None:
    folder = golden_dir(tmp_path, "l4-backend-not-found")
    assert main(["validate", "-f", str(folder)]) == 0
    assert main(["validate", "-f", str(folder), "--strict"]) == 1


def test_validate_reads_one_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = golden_dir(tmp_path, "invalid-l4-port")
    assert main(["validate", "-f", str(folder / "backends.yaml")]) == 1  # Services only
    assert "error: no L4Listener or L7Route in" in capsys.readouterr().out
    assert main(["validate", "-f", str(ROOT / "examples/quickstart/routes.yaml")]) == 0
    # Without backend.yaml beside it, its Services are unknown: warnings, not errors.
    assert "ok: 2 objects valid, 2 warnings" in capsys.readouterr().out
    assert main(["validate", "-f", str(folder / "invalid-l4-port.yaml")]) == 1


def test_validate_fails_when_it_finds_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "-f", str(tmp_path)]) == 1
    assert "error: no L4Listener or L7Route in" in capsys.readouterr().out
    assert main(["validate", "-f", str(tmp_path / "missing")]) == 1
    assert "not a folder or a file" in capsys.readouterr().out


def test_validate_says_subfolders_are_not_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "shop").mkdir()
    golden_dir(tmp_path / "shop", "l4-backend-not-found")
    assert main(["validate", "-f", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"note: {tmp_path / 'shop'}/ not read" in out
    assert main(["validate", "-f", str(tmp_path / "shop")]) == 0


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == "bilayer 0.1.0"


@pytest.mark.parametrize(
    "timing", [["--lease-duration=5", "--renew-deadline=6"], ["--renew-deadline=2", "--retry-period=2"]]
)
def test_operator_refuses_lease_timing_that_cannot_work(timing: list[str]) -> None:
    """At once, not after the first listing (when the Lease is first tried)."""
    with pytest.raises(SystemExit, match="lease duration > renew deadline > retry period"):
        main(["operator", *timing])


def test_compile_prints_the_table_with_keys_redacted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = golden_dir(tmp_path, "tls-basic")
    assert main(["compile", "-f", str(folder)]) == 0
    table = json.loads(capsys.readouterr().out)
    cert = table["listeners"]["8443"]["l7"]["tls"]["certificates"][0]
    assert cert["keyPem"].startswith("<redacted")
    assert cert["certPem"].startswith("-----BEGIN CERTIFICATE-----")
    assert main(["compile", "-f", str(folder), "--show-secrets"]) == 0
    assert "PRIVATE KEY" in capsys.readouterr().out


def test_compile_statuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = golden_dir(tmp_path, "l4-port-conflict-oldest-wins")
    main(["compile", "-f", str(folder), "--statuses"])
    statuses = json.loads(capsys.readouterr().out)
    assert statuses["L4Listener shop/a-newer"][0]["reason"] == "PortConflict"


def test_explain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = golden_dir(tmp_path, "l7-precedence-method-headers-query")
    main(["explain", "-f", str(folder), "--host", "h", "--path", "/x?v=2", "--header", "x-canary=false"])
    out = capsys.readouterr().out
    assert "route:    L7Route shop/fine, rule 1 (one-query)" in out
    assert "backend:  shop/api:80 weight 1: 2 endpoints" in out
    assert "rule 4 [PathPrefix /x, method POST] on host *: method is GET, needs POST" in out
    assert "header x-canary is 'false', needs 'true'" in out


def test_explain_names_mirrors_sessions_and_cors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for case in ("m", "s", "c"):
        (tmp_path / case).mkdir()
    main(["explain", "-f", str(golden_dir(tmp_path / "m", "l7-mirror")), "--host", "h", "--path", "/x"])
    out = capsys.readouterr().out
    assert "copied to shop/canary:80 (100% of requests); copied to shop/api:80 (25% of requests)" in out
    main(
        [
            "explain",
            "-f",
            str(golden_dir(tmp_path / "s", "l7-session-persistence")),
            "--host",
            "h",
            "--path",
            "/c",
        ]
    )
    assert "kept on its endpoint by the header x-session" in capsys.readouterr().out
    main(["explain", "-f", str(golden_dir(tmp_path / "c", "l7-cors")), "--host", "h", "--path", "/app"])
    assert "CORS preflights answered by the proxy" in capsys.readouterr().out


def test_explain_no_route_and_bad_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = golden_dir(tmp_path, "l7-hostnames")
    main(["explain", "-f", str(folder), "--host", "nope.org", "--path", "/v1"])
    assert "404 Not Found" in capsys.readouterr().out
    main(["explain", "-f", str(folder), "--host", "api.example.com", "--path", "/../x"])
    assert "400 Bad Request: the request path climbs above the root" in capsys.readouterr().out


def test_crds_prints_both(capsys: pytest.CaptureFixture[str]) -> None:
    main(["crds"])
    out = capsys.readouterr().out
    assert "name: l4listeners.bilayer.dev" in out and "name: l7routes.bilayer.dev" in out


@pytest.mark.parametrize(
    "command", ["run", "validate", "compile", "explain", "crds", "dataplane", "operator"]
)
def test_help_is_complete(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: bilayer" in out
    if "-f PATH" in out:  # every option that reads objects says what it reads
        assert "subfolders are not read" in " ".join(out.split())
