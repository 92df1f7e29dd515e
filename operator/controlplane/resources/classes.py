"""Which install an L4Listener or L7Route belongs to: its class.

Two installs in one cluster (say internal and external ingress) each serve the objects of
their own class and leave the others alone. An object without className belongs to the
default class, as an Ingress without ingressClassName belongs to the default controller:
objects written before classes existed stay served by a plain `helm install`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import Field

from .common import PATTERN_HELP

DEFAULT_CLASS = "bilayer"
# A DNS label, as IngressClass and GatewayClass names are in practice: short, lower case.
CLASS_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
PATTERN_HELP[CLASS_PATTERN] = "a class name: a DNS label such as internal (lower-case letters, digits, '-')"
_CLASS = re.compile(CLASS_PATTERN)

ClassName = Annotated[str, Field(min_length=1, max_length=63, pattern=CLASS_PATTERN)]

# The kinds that carry a class: compiler.snapshot.ROUTE_KINDS, which sits above the models.
CLASSED_KINDS = ("L4Listener", "L7Route")


def valid_class(name: str) -> bool:
    """Whether name may be a class: what the CRD admits in spec.className."""
    return len(name) <= 63 and _CLASS.fullmatch(name) is not None


def class_of(obj: Mapping[str, Any]) -> str:
    """The class an object belongs to. Only a well-formed className names a class; a
    malformed one (possible in files only, the CRD refuses it) counts as absent, so the
    object is compiled by the default class and reported Invalid rather than skipped."""
    spec = obj.get("spec")
    name = spec.get("className") if isinstance(spec, Mapping) else None
    return name if isinstance(name, str) and valid_class(name) else DEFAULT_CLASS


def in_class(obj: Mapping[str, Any], class_name: str) -> bool:
    """Whether an install of class_name serves obj. Objects of other kinds (Services,
    EndpointSlices, Secrets) belong to every class: routes of any class may name them."""
    return obj.get("kind") not in CLASSED_KINDS or class_of(obj) == class_name
