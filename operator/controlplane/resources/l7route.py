"""The L7Route resource: route HTTP by host, path, headers and query, as Gateway API's HTTPRoute."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from dataplane import regex

from .common import (
    PATTERN_HELP,
    BackendRef,
    Duration,
    HeaderName,
    Model,
    ObjectName,
    Port,
    RequestKey,
    Status,
    parse_duration,
)

HOSTNAME_PATTERN = r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
PATTERN_HELP[HOSTNAME_PATTERN] = "a lower-case DNS name (api.example.com) or a wildcard (*.example.com)"
Hostname = Annotated[
    str,
    Field(
        max_length=253,
        pattern=HOSTNAME_PATTERN,
        description="A lower-case DNS name, or *.suffix for any name below suffix.",
    ),
]
PRECISE_HOSTNAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
PATTERN_HELP[PRECISE_HOSTNAME_PATTERN] = "a lower-case DNS name (api.example.com), no wildcard"
PreciseHostname = Annotated[str, Field(max_length=253, pattern=PRECISE_HOSTNAME_PATTERN)]
# A header value may hold any visible character, space and tab, never a control character:
# a CR or LF would end the header line the proxy writes it on.
HEADER_VALUE_PATTERN = r"^[^\x00-\x08\x0a-\x1f\x7f]*$"
PATTERN_HELP[HEADER_VALUE_PATTERN] = "a header value without control characters (no CR, LF or NUL)"
# Gateway API's HTTPPathModifier: RFC 3986 path characters and percent-escapes only.
REWRITE_PATH_PATTERN = r"^/([-A-Za-z0-9/._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2})*$"
PATTERN_HELP[REWRITE_PATH_PATTERN] = (
    "a path starting with '/' of RFC 3986 path characters and %XX escapes "
    "(no space, '?' or control character)"
)
RewritePath = Annotated[str, Field(max_length=1024, pattern=REWRITE_PATH_PATTERN)]
Method = Literal["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"]

# Gateway API refuses these in Exact and PathPrefix values: they would never match a
# normalized request path.
_PATH_FORBIDDEN = ("//", "/./", "/../", "%2f", "%2F", "#")


def _check_plain_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"path {value!r} must start with '/'")
    for bad in _PATH_FORBIDDEN:
        if bad in value:
            raise ValueError(f"path {value!r} must not contain {bad!r}; requests are normalized first")
    if value.endswith(("/..", "/.")):
        raise ValueError(f"path {value!r} must not end with a dot segment")
    return value


class PathMatch(Model):
    """Match the request path."""

    type: Literal["Exact", "PathPrefix", "RegularExpression"] = Field(
        default="PathPrefix",
        description="Exact, PathPrefix (whole segments) or RegularExpression (full match, RE2 syntax).",
    )
    value: str = Field(default="/", max_length=1024, description="The path, prefix or pattern.")

    @model_validator(mode="after")
    def _valid_value(self) -> PathMatch:
        if self.type == "RegularExpression":
            trouble = regex.problem(self.value)
            if trouble is not None:
                raise ValueError(f"path regular expression {self.value!r} is {trouble}")
        else:
            _check_plain_path(self.value)
        return self


class HeaderMatch(Model):
    """Match one request header (names compare case-insensitively)."""

    name: HeaderName = Field(description="Header name.")
    value: str = Field(
        max_length=4096, description="Value, or pattern for RegularExpression (full match, RE2 syntax)."
    )
    type: Literal["Exact", "RegularExpression"] = Field(
        default="Exact", description="Exact or RegularExpression."
    )

    @model_validator(mode="after")
    def _valid_pattern(self) -> HeaderMatch:
        if self.type == "RegularExpression":
            trouble = regex.problem(self.value)
            if trouble is not None:
                raise ValueError(f"regular expression {self.value!r} is {trouble}")
        return self


class QueryParamMatch(HeaderMatch):
    """Match one query parameter (names compare exactly)."""


class RouteMatch(Model):
    """Conditions that must all hold for a request to match."""

    path: PathMatch = Field(default_factory=PathMatch, description="Path condition; default PathPrefix /.")
    headers: list[HeaderMatch] = Field(
        default_factory=list, max_length=16, description="Headers that must match."
    )
    queryParams: list[QueryParamMatch] = Field(
        default_factory=list, max_length=16, description="Query parameters that must match."
    )
    method: Method | None = Field(default=None, description="HTTP method that must match.")

    @field_validator("headers")
    @classmethod
    def _unique_headers(cls, headers: list[HeaderMatch]) -> list[HeaderMatch]:
        names = [h.name.lower() for h in headers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"header {dupes[0]!r} is matched twice; keep one match per header")
        return headers


class HeaderValue(Model):
    """A header name and value."""

    name: HeaderName = Field(description="Header name.")
    value: str = Field(
        max_length=4096, pattern=HEADER_VALUE_PATTERN, description="Header value (no control characters)."
    )


# Written by the proxy from its own parse or meaningful for one hop only: a modifier that
# touched them could change how the next hop splits messages.
PROXY_MANAGED_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "host",
    }
)


class HeaderModifier(Model):
    """Set, add or remove headers."""

    set: list[HeaderValue] = Field(default_factory=list, max_length=16, description="Replace these headers.")
    add: list[HeaderValue] = Field(default_factory=list, max_length=16, description="Append these headers.")
    remove: list[HeaderName] = Field(default_factory=list, max_length=16, description="Remove these headers.")

    @model_validator(mode="after")
    def _not_proxy_managed(self) -> HeaderModifier:
        for op, names in (
            ("set", [h.name for h in self.set]),
            ("add", [h.name for h in self.add]),
            ("remove", self.remove),
        ):
            for index, name in enumerate(names):
                if name.lower().replace("_", "-") in PROXY_MANAGED_HEADERS:
                    hint = "; change the host with a URLRewrite filter" if name.lower() == "host" else ""
                    raise ValueError(
                        f"{op}[{index}]: header {name} is written by the proxy (framing or hop-by-hop) "
                        f"and cannot be modified{hint}"
                    )
        return self


class PathModifier(Model):
    """Replace the whole path or the part that matched a PathPrefix."""

    type: Literal["ReplaceFullPath", "ReplacePrefixMatch"] = Field(
        description="ReplaceFullPath or ReplacePrefixMatch."
    )
    replaceFullPath: RewritePath | None = Field(default=None, description="New path for ReplaceFullPath.")
    replacePrefixMatch: RewritePath | None = Field(
        default=None, description="Replaces the matched prefix for ReplacePrefixMatch."
    )

    @model_validator(mode="after")
    def _one_value(self) -> PathModifier:
        value = self.replaceFullPath if self.type == "ReplaceFullPath" else self.replacePrefixMatch
        other = self.replacePrefixMatch if self.type == "ReplaceFullPath" else self.replaceFullPath
        field = "replaceFullPath" if self.type == "ReplaceFullPath" else "replacePrefixMatch"
        if value is None:
            raise ValueError(f"type {self.type} needs {field}")
        if other is not None:
            raise ValueError(f"type {self.type} takes only {field}")
        _check_plain_path(value)
        return self


class URLRewrite(Model):
    """Rewrite the request before it goes to the backend."""

    hostname: PreciseHostname | None = Field(default=None, description="New Host header (a DNS name).")
    path: PathModifier | None = Field(default=None, description="New path.")


class RequestRedirect(Model):
    """Answer with a redirect instead of forwarding."""

    scheme: Literal["http", "https"] | None = Field(default=None, description="Scheme of the Location.")
    hostname: PreciseHostname | None = Field(default=None, description="Host of the Location (a DNS name).")
    port: Port | None = Field(default=None, description="Port of the Location.")
    path: PathModifier | None = Field(default=None, description="Path of the Location.")
    statusCode: Literal[301, 302] = Field(default=302, description="301 or 302.")


FilterType = Literal["RequestHeaderModifier", "ResponseHeaderModifier", "URLRewrite", "RequestRedirect"]
_FILTER_FIELDS: dict[str, str] = {
    "RequestHeaderModifier": "requestHeaderModifier",
    "ResponseHeaderModifier": "responseHeaderModifier",
    "URLRewrite": "urlRewrite",
    "RequestRedirect": "requestRedirect",
}


class Filter(Model):
    """One processing step; the field named after the type holds its settings."""

    type: FilterType = Field(
        description="RequestHeaderModifier, ResponseHeaderModifier, URLRewrite or RequestRedirect."
    )
    requestHeaderModifier: HeaderModifier | None = Field(
        default=None, description="For RequestHeaderModifier."
    )
    responseHeaderModifier: HeaderModifier | None = Field(
        default=None, description="For ResponseHeaderModifier."
    )
    urlRewrite: URLRewrite | None = Field(default=None, description="For URLRewrite.")
    requestRedirect: RequestRedirect | None = Field(default=None, description="For RequestRedirect.")

    @model_validator(mode="after")
    def _settings_match_type(self) -> Filter:
        wanted = _FILTER_FIELDS[self.type]
        if getattr(self, wanted) is None:
            raise ValueError(f"filter type {self.type} needs the field {wanted}")
        extra = [f for f in _FILTER_FIELDS.values() if f != wanted and getattr(self, f) is not None]
        if extra:
            raise ValueError(f"filter type {self.type} must not set {extra[0]}; set only {wanted}")
        return self


class RouteTimeouts(Model):
    """Request timeouts; a timed-out request gets 504. 0s disables a timeout."""

    request: Duration | None = Field(
        default=None, description="Limit on the whole exchange, retries included; 0s: none."
    )
    backendRequest: Duration | None = Field(
        default=None, description="Limit on each attempt to a backend; 0s: none."
    )


class Retry(Model):
    """Retry safe requests on connect failure and on these status codes."""

    attempts: Annotated[int, Field(ge=0, le=10)] = Field(
        default=2, description="Extra attempts after the first."
    )
    codes: list[Annotated[int, Field(ge=500, le=599)]] = Field(
        default_factory=lambda: [502, 503, 504],
        max_length=16,
        description="Status codes that are retried.",
    )
    backoff: Duration = Field(default="25ms", description="Base of the exponential backoff between attempts.")


class RateLimit(Model):
    """A local token bucket per key; requests over it get 429."""

    requests: Annotated[int, Field(ge=1, le=1_000_000_000)] = Field(description="Requests allowed per unit.")
    unit: Literal["Second", "Minute", "Hour"] = Field(default="Second", description="Second, Minute or Hour.")
    burst: Annotated[int, Field(ge=1, le=1_000_000_000)] | None = Field(
        default=None, description="Bucket size; defaults to requests."
    )
    key: RequestKey = Field(default="ClientIP", description="ClientIP, or {header: NAME}.")


class RouteLoadBalancing(Model):
    """How an endpoint of the chosen backend is picked for each request."""

    policy: Literal["LeastRequest", "RoundRobin", "Random", "ConsistentHash"] = Field(
        default="LeastRequest",
        description="LeastRequest (power of two choices), RoundRobin, Random or ConsistentHash on key.",
    )
    key: RequestKey = Field(
        default="ClientIP", description="Hash key for ConsistentHash: ClientIP or {header: NAME}."
    )


class RouteRule(Model):
    """Matches, filters and backends; a request takes the first matching rule by precedence."""

    name: ObjectName | None = Field(default=None, description="Optional rule name, shown by bilayer explain.")
    matches: list[RouteMatch] = Field(
        default_factory=lambda: [RouteMatch()],
        min_length=1,
        max_length=64,
        description="Any one match selects this rule; default PathPrefix /.",
    )
    filters: list[Filter] = Field(default_factory=list, max_length=16, description="Steps applied in order.")
    backendRefs: list[BackendRef] = Field(
        default_factory=list, max_length=16, description="Where matching requests go."
    )
    timeouts: RouteTimeouts | None = Field(default=None, description="Request timeouts.")
    retry: Retry | None = Field(default=None, description="Retry policy; none when absent.")
    rateLimit: RateLimit | None = Field(default=None, description="Local rate limit; none when absent.")
    loadBalancing: RouteLoadBalancing = Field(
        default_factory=RouteLoadBalancing, description="Endpoint choice within a backend."
    )

    @model_validator(mode="after")
    def _filters_consistent(self) -> RouteRule:
        types = [f.type for f in self.filters]
        for kind in set(types):
            if types.count(kind) > 1:
                raise ValueError(f"filter {kind} appears {types.count(kind)} times; use it once per rule")
        if "RequestRedirect" in types and "URLRewrite" in types:
            raise ValueError("a rule cannot both redirect (RequestRedirect) and rewrite (URLRewrite)")
        if "RequestRedirect" in types and self.backendRefs:
            raise ValueError("a rule with RequestRedirect answers itself; remove its backendRefs")
        path_mods = [(f.urlRewrite or f.requestRedirect) for f in self.filters]
        replaces_prefix = any(
            m is not None and m.path is not None and m.path.type == "ReplacePrefixMatch" for m in path_mods
        )
        if replaces_prefix and any(m.path.type != "PathPrefix" for m in self.matches):
            raise ValueError("ReplacePrefixMatch needs every match of the rule to be a PathPrefix match")
        timeouts = self.timeouts
        request = parse_duration(timeouts.request) if timeouts and timeouts.request else 0.0
        backend = parse_duration(timeouts.backendRequest) if timeouts and timeouts.backendRequest else 0.0
        if request and backend > request:  # 0s disables a timeout: nothing to compare with
            raise ValueError("timeouts.backendRequest must not exceed timeouts.request")
        return self


class RouteTLS(Model):
    """Terminate TLS on the route's port with a certificate chosen by SNI."""

    secretName: ObjectName = Field(description="A kubernetes.io/tls Secret in the route's namespace.")


class L7RouteSpec(Model):
    """Route HTTP requests arriving on port."""

    port: Port = Field(description="Port the dataplane listens on; routes sharing a port share a listener.")
    hostnames: list[Hostname] = Field(
        default_factory=list, max_length=16, description="Hosts served; empty: any."
    )
    tls: RouteTLS | None = Field(default=None, description="Terminate TLS on this port.")
    rules: list[RouteRule] = Field(
        default_factory=lambda: [RouteRule()],
        min_length=1,
        max_length=16,
        description="Routing rules.",
    )
    allowEncodedSlashes: bool = Field(
        default=False,
        description="Accept %2F in request paths matched to this route (rejected with 400 otherwise).",
    )

    @field_validator("hostnames")
    @classmethod
    def _unique_hostnames(cls, hostnames: list[str]) -> list[str]:
        if len(set(hostnames)) != len(hostnames):
            raise ValueError("hostnames must be unique")
        return hostnames


class L7Route(Model):
    """An L7Route object as stored in Kubernetes."""

    apiVersion: Literal["bilayer.dev/v1alpha1"] = Field(description="bilayer.dev/v1alpha1")
    kind: Literal["L7Route"] = Field(description="L7Route")
    metadata: dict[str, object] = Field(description="Standard object metadata.")
    spec: L7RouteSpec = Field(description="Hosts, rules and backends.")
    status: Status | None = Field(default=None, description="Conditions set by the operator.")
