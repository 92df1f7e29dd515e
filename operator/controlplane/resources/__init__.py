"""Pydantic models of the custom resources and of the Kubernetes objects the compiler reads."""

from .common import API_GROUP, API_VERSION, GROUP_VERSION, BackendRef, Condition, parse_duration
from .l4listener import L4Listener, L4ListenerSpec
from .l7route import L7Route, L7RouteSpec

__all__ = [
    "API_GROUP",
    "API_VERSION",
    "GROUP_VERSION",
    "BackendRef",
    "Condition",
    "L4Listener",
    "L4ListenerSpec",
    "L7Route",
    "L7RouteSpec",
    "parse_duration",
]
