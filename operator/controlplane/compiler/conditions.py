"""Status conditions the compiler reports, and turning validation errors into messages."""

from __future__ import annotations

import functools

from pydantic import ValidationError

from ..resources.common import PATTERN_HELP, Condition

ACCEPTED = "Accepted"
RESOLVED_REFS = "ResolvedRefs"
PROGRAMMED = "Programmed"

# Reasons
INVALID = "Invalid"
PORT_CONFLICT = "PortConflict"
PROTOCOL_CONFLICT = "ProtocolConflict"
BACKEND_NOT_FOUND = "BackendNotFound"
REF_NOT_PERMITTED = "RefNotPermitted"
INVALID_CERTIFICATE_REF = "InvalidCertificateRef"
INVALID_CA_CERTIFICATE_REF = "InvalidCACertificateRef"
UNSUPPORTED_PROTOCOL = "UnsupportedProtocol"


@functools.lru_cache(maxsize=4096)
def condition(kind: str, ok: bool, reason: str, message: str, generation: int | None) -> Condition:
    """The condition, shared by every object that has the same one: at 10,000 routes most
    conditions are alike ("serving HTTP on port 8080"), and one object each was 20 MB.
    Conditions are never changed in place (status.merge copies)."""
    return Condition(
        type=kind,
        status="True" if ok else "False",
        reason=reason,
        message=message,
        observedGeneration=generation,
    )


def describe_validation_error(err: ValidationError, limit: int = 5) -> list[str]:
    """One line per problem: the field path, what is wrong and what is allowed."""
    lines = []
    for problem in err.errors()[:limit]:
        where = _field_path(problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        value = problem.get("input")
        pattern = (problem.get("ctx") or {}).get("pattern")
        if problem["type"] == "extra_forbidden":
            message = "unknown field; check the spelling against `kubectl explain`"
        elif problem["type"] == "missing":
            message = "required field is missing"
        elif pattern in PATTERN_HELP:
            message = f"{value!r} is not {PATTERN_HELP[pattern]}"
        elif isinstance(value, (int, float, str)) and problem["type"] not in (
            "value_error",
            "assertion_error",
        ):
            message = f"{message} (got {value!r})"
        lines.append(f"{where}: {message}" if where else message)
    if err.error_count() > limit:
        lines.append(f"... and {err.error_count() - limit} more")
    return lines


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif "[" in part or part in {"function-after", "function-before", "HeaderKey"}:
            # pydantic's names for union branches and validators carry no meaning for users.
            continue
        else:
            path += f".{part}" if path else part
    return path
