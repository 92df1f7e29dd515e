"""Types shared by both resources: durations, backend references, request keys."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic.json_schema import WithJsonSchema

API_GROUP = "bilayer.dev"
API_VERSION = "v1alpha1"
GROUP_VERSION = f"{API_GROUP}/{API_VERSION}"

# Gateway API's Duration: up to four number+unit pairs, e.g. "1h30m", "500ms".
DURATION_PATTERN = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"
_DURATION_PART = re.compile(r"([0-9]{1,5})(ms|h|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(text: str) -> float:
    """Seconds in a Gateway API duration string such as ``1m30s`` or ``250ms``."""
    if not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError(
            f"{text!r} is not a duration; use a number and a unit (h, m, s, ms), e.g. 5s or 1m30s"
        )
    return sum(int(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(text))


# What each pattern means, for error messages: users should never read a raw regex.
PATTERN_HELP: dict[str, str] = {
    DURATION_PATTERN: "a duration: a number and a unit (h, m, s, ms), e.g. 5s, 250ms or 1m30s",
}

Duration = Annotated[
    str,
    Field(pattern=DURATION_PATTERN, max_length=20),
]

Port = Annotated[int, Field(ge=1, le=65535)]
Weight = Annotated[int, Field(ge=0, le=1_000_000)]
# A DNS-1123 subdomain: what Kubernetes accepts as an object name.
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
HEADER_NAME_PATTERN = r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$"
PATTERN_HELP[NAME_PATTERN] = "a lower-case DNS name such as my-service (letters, digits, '-', '.')"
PATTERN_HELP[HEADER_NAME_PATTERN] = "an HTTP header name (letters, digits and !#$%&'*+-.^_`|~)"
ObjectName = Annotated[str, Field(min_length=1, max_length=253, pattern=NAME_PATTERN)]
HeaderName = Annotated[str, Field(min_length=1, max_length=256, pattern=HEADER_NAME_PATTERN)]


class Model(BaseModel):
    """Base for resource models: camelCase fields as in YAML, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class BackendRef(Model):
    """A Service port that receives traffic, with a relative weight."""

    name: ObjectName = Field(description="Name of a Service in the route's namespace.")
    namespace: ObjectName | None = Field(
        default=None,
        description="Namespace of the Service; only the object's own namespace is permitted.",
    )
    port: Port = Field(description="Port number of the Service (spec.ports[].port).")
    weight: Weight = Field(
        default=1,
        description="Relative share of traffic (0-1000000); 0 sends nothing to this backend.",
    )


class HeaderKey(Model):
    """Use the value of a request header as the key."""

    header: HeaderName = Field(description="Request header whose value is the key.")


def _request_key_schema() -> dict[str, Any]:
    # A string-or-object field has no structural schema; the CRD keeps it open and
    # the compiler validates it, naming the field and the two accepted forms.
    return {
        "x-kubernetes-preserve-unknown-fields": True,
        "description": "ClientIP, or {header: NAME} to use the value of that request header.",
    }


def _request_key(value: Any) -> Any:
    if value == "ClientIP" or isinstance(value, HeaderKey):
        return value
    if isinstance(value, dict) and set(value) == {"header"}:
        return HeaderKey.model_validate(value)
    raise ValueError(f"{value!r} is not a key; use ClientIP or {{header: NAME}}")


RequestKey = Annotated[
    Literal["ClientIP"] | HeaderKey,
    BeforeValidator(_request_key),
    WithJsonSchema(_request_key_schema()),
]


class Condition(Model):
    """A status condition in the shape of metav1.Condition."""

    type: str = Field(description="Accepted, ResolvedRefs or Programmed.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="A CamelCase word that says why.")
    message: str = Field(default="", description="What is wrong and how to fix it.")
    observedGeneration: int | None = Field(
        default=None, description="metadata.generation this condition was computed from."
    )
    lastTransitionTime: str | None = Field(default=None, description="When status last changed (RFC 3339).")


class Status(Model):
    """Conditions written by the operator."""

    conditions: list[Condition] = Field(
        default_factory=list, description="Accepted, ResolvedRefs and Programmed."
    )
