"""The L7Route resource: route HTTP by host, path, headers and query, as Gateway API's HTTPRoute."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator
from pydantic.json_schema import WithJsonSchema

from dataplane import regex

from .classes import ClassName
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


# GRPCRoute's names: a protobuf service (package.Service, optionally fully qualified with a
# leading dot) and a protobuf method (one identifier).
GRPC_SERVICE_PATTERN = r"^\.?[A-Za-z_][A-Za-z_0-9]*(\.[A-Za-z_][A-Za-z_0-9]*)*$"
GRPC_METHOD_PATTERN = r"^[A-Za-z_][A-Za-z_0-9]*$"
_GRPC_SERVICE = re.compile(GRPC_SERVICE_PATTERN)
_GRPC_METHOD = re.compile(GRPC_METHOD_PATTERN)
# What a regular expression for a service or a method stands for when it is omitted: one
# path segment.
_ANY_SEGMENT = "[^/]+"


class GRPCMatch(Model):
    """Match a gRPC call by service and method (Gateway API GRPCRoute's method match): the
    request path is /package.Service/Method and the method POST."""

    type: Literal["Exact", "RegularExpression"] = Field(
        default="Exact", description="Exact, or RegularExpression (full match, RE2 syntax) for both names."
    )
    service: Annotated[str, Field(min_length=1, max_length=1024)] | None = Field(
        default=None, description="The service, package included (helloworld.Greeter); absent: any service."
    )
    method: Annotated[str, Field(min_length=1, max_length=1024)] | None = Field(
        default=None, description="The method (SayHello); absent: any method of the service."
    )

    @model_validator(mode="after")
    def _valid_names(self) -> GRPCMatch:
        if self.service is None and self.method is None:
            raise ValueError("set service, method or both; to match every call, use path PathPrefix /")
        for field, value in (("service", self.service), ("method", self.method)):
            if value is None:
                continue
            if "/" in value:
                raise ValueError(f"{field} {value!r} must not contain '/': the path is /service/method")
            if self.type == "RegularExpression":
                trouble = regex.problem(value)
                if trouble is not None:
                    raise ValueError(f"{field} regular expression {value!r} is {trouble}")
            elif field == "service" and not _GRPC_SERVICE.match(value):
                raise ValueError(
                    f"service {value!r} is not a protobuf service name: dot-separated identifiers "
                    "(letters, digits, '_', not starting with a digit), e.g. helloworld.Greeter"
                )
            elif field == "method" and not _GRPC_METHOD.match(value):
                raise ValueError(
                    f"method {value!r} is not a protobuf method name: one identifier (letters, digits, "
                    "'_', not starting with a digit), e.g. SayHello"
                )
        return self

    def path(self) -> PathMatch:
        """The path condition the match compiles to: an Exact path for service and method,
        a PathPrefix for a service alone, a regular expression otherwise."""
        service = self.service.removeprefix(".") if self.service is not None else None
        if self.type == "Exact" and service is not None and self.method is not None:
            return PathMatch.model_construct(type="Exact", value=f"/{service}/{self.method}")
        if self.type == "Exact" and service is not None:
            return PathMatch.model_construct(type="PathPrefix", value=f"/{service}/")
        if self.type == "Exact":
            return PathMatch.model_construct(type="RegularExpression", value=f"/{_ANY_SEGMENT}/{self.method}")
        return PathMatch.model_construct(
            type="RegularExpression",
            value=f"/({self.service or _ANY_SEGMENT})/({self.method or _ANY_SEGMENT})",
        )

    def specificity(self) -> tuple[int, int]:
        """Characters of the service and of the method matched exactly (GRPCRoute's
        precedence; a regular expression counts none)."""
        if self.type != "Exact":
            return (0, 0)
        return (len((self.service or "").removeprefix(".")), len(self.method or ""))


class RouteMatch(Model):
    """Conditions that must all hold for a request to match."""

    path: PathMatch = Field(default_factory=PathMatch, description="Path condition; default PathPrefix /.")
    grpc: GRPCMatch | None = Field(
        default=None,
        description=(
            "Match a gRPC call by service and method (GRPCRoute style) instead of path and method; "
            "header matches still apply."
        ),
    )
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

    @model_validator(mode="after")
    def _grpc_alone(self) -> RouteMatch:
        if self.grpc is not None:
            if "path" in self.model_fields_set:
                raise ValueError(
                    "grpc and path cannot be combined: a gRPC match is the path /service/method; "
                    "use one match for each"
                )
            if self.method is not None:
                raise ValueError("grpc and method cannot be combined: a gRPC call is always a POST")
            regex_path = self.grpc.path()
            if regex_path.type == "RegularExpression":
                trouble = regex.problem(regex_path.value)
                if trouble is not None:
                    raise ValueError(f"grpc: the path pattern {regex_path.value!r} is {trouble}")
        return self

    def request_path(self) -> PathMatch:
        """The path condition: the path's, or the one a gRPC match compiles to."""
        return self.grpc.path() if self.grpc is not None else self.path

    def request_method(self) -> str | None:
        """The method condition: a gRPC match implies POST."""
        return "POST" if self.grpc is not None else self.method


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
    statusCode: Literal[301, 302, 303, 307, 308] = Field(
        default=302,
        description=(
            "301 or 308 (permanent), 302, 303 or 307 (temporary); 307 and 308 keep the method and body."
        ),
    )


class MirrorBackendRef(Model):
    """A Service port that receives copies of requests."""

    name: ObjectName = Field(description="Name of a Service in the route's namespace.")
    namespace: ObjectName | None = Field(
        default=None,
        description="Namespace of the Service; only the object's own namespace is permitted.",
    )
    port: Port = Field(description="Port number of the Service (spec.ports[].port).")


class Fraction(Model):
    """numerator/denominator of the requests."""

    numerator: Annotated[int, Field(ge=0, le=2_147_483_647)] = Field(description="Requests mirrored ...")
    denominator: Annotated[int, Field(ge=1, le=2_147_483_647)] = Field(
        default=100, description="... out of this many; default 100."
    )

    @model_validator(mode="after")
    def _at_most_one(self) -> Fraction:
        if self.numerator > self.denominator:
            raise ValueError(f"numerator ({self.numerator}) must not exceed denominator ({self.denominator})")
        return self


class RequestMirror(Model):
    """Send a copy of each request (or of a share) to another backend; its answers are dropped."""

    backendRef: MirrorBackendRef = Field(description="Where the copies go: one endpoint per copy.")
    percent: Annotated[int, Field(ge=0, le=100)] | None = Field(
        default=None, description="Share of requests copied (0-100); default all. Or use fraction."
    )
    fraction: Fraction | None = Field(default=None, description="Share of requests copied, as a fraction.")

    @model_validator(mode="after")
    def _one_share(self) -> RequestMirror:
        if self.percent is not None and self.fraction is not None:
            raise ValueError("set percent or fraction, not both")
        return self

    @property
    def share(self) -> float:
        """The share of requests copied, 0-1."""
        if self.fraction is not None:
            return self.fraction.numerator / self.fraction.denominator
        return 1.0 if self.percent is None else self.percent / 100


# An origin is scheme://host[:port]; the host may start with "*." (any labels to the left)
# or be "*"; "*" alone allows every origin.
ORIGIN_PATTERN = (
    r"^(\*|https?://(\*|(\*\.)?[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*)"
    r"(:[0-9]{1,5})?)$"
)
PATTERN_HELP[ORIGIN_PATTERN] = (
    "an origin: '*', or scheme://host[:port] with scheme http or https, "
    "e.g. https://app.example.com or https://*.example.com"
)
Origin = Annotated[str, Field(max_length=253, pattern=ORIGIN_PATTERN)]
MethodOrAny = Literal["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "*"]


def _alone(field: str, values: list[str]) -> None:
    if "*" in values and len(values) > 1:
        raise ValueError(f"{field}: '*' allows everything and must be the only entry")


def _unique(field: str, values: list[str], *, fold: bool) -> None:
    seen: set[str] = set()
    for value in values:
        key = value.lower() if fold else value
        if key in seen:
            raise ValueError(f"{field}: {value!r} is listed twice")
        seen.add(key)


class CORS(Model):
    """Cross-origin resource sharing: the proxy answers preflight requests and adds the
    Access-Control-* headers to responses for allowed origins."""

    allowOrigins: list[Origin] = Field(
        default_factory=list,
        max_length=64,
        description="Origins allowed; '*' for any; https://*.example.com.",
    )
    allowMethods: list[MethodOrAny] = Field(
        default_factory=list,
        max_length=10,
        description="Methods allowed (GET, HEAD, POST always are); '*': any.",
    )
    allowHeaders: list[HeaderName] = Field(
        default_factory=list, max_length=64, description="Request headers allowed; '*' for any."
    )
    exposeHeaders: list[HeaderName] = Field(
        default_factory=list, max_length=64, description="Response headers scripts may read; '*' for any."
    )
    allowCredentials: bool = Field(
        default=False, description="Allow cookies and credentials (then '*' answers echo the request)."
    )
    maxAge: Annotated[int, Field(ge=1, le=86_400)] = Field(
        default=5, description="Seconds a browser may cache a preflight answer; default 5."
    )

    @model_validator(mode="after")
    def _wildcards(self) -> CORS:
        _alone("allowOrigins", list(self.allowOrigins))
        _alone("allowMethods", list(self.allowMethods))
        _alone("allowHeaders", list(self.allowHeaders))
        _alone("exposeHeaders", list(self.exposeHeaders))
        _unique("allowOrigins", list(self.allowOrigins), fold=True)
        _unique("allowMethods", list(self.allowMethods), fold=False)
        _unique("allowHeaders", list(self.allowHeaders), fold=True)
        _unique("exposeHeaders", list(self.exposeHeaders), fold=True)
        return self


FilterType = Literal[
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "URLRewrite",
    "RequestRedirect",
    "RequestMirror",
    "CORS",
]
_FILTER_FIELDS: dict[str, str] = {
    "RequestHeaderModifier": "requestHeaderModifier",
    "ResponseHeaderModifier": "responseHeaderModifier",
    "URLRewrite": "urlRewrite",
    "RequestRedirect": "requestRedirect",
    "RequestMirror": "requestMirror",
    "CORS": "cors",
}
# Filters allowed on a backendRef (applied only to requests sent to that backend): a redirect
# or a CORS answer is given before any backend is chosen.
BACKEND_FILTERS = ("RequestHeaderModifier", "ResponseHeaderModifier", "URLRewrite", "RequestMirror")


class Filter(Model):
    """One processing step; the field named after the type holds its settings."""

    type: FilterType = Field(
        description=(
            "RequestHeaderModifier, ResponseHeaderModifier, URLRewrite, RequestRedirect, "
            "RequestMirror or CORS."
        )
    )
    requestHeaderModifier: HeaderModifier | None = Field(
        default=None, description="For RequestHeaderModifier."
    )
    responseHeaderModifier: HeaderModifier | None = Field(
        default=None, description="For ResponseHeaderModifier."
    )
    urlRewrite: URLRewrite | None = Field(default=None, description="For URLRewrite.")
    requestRedirect: RequestRedirect | None = Field(default=None, description="For RequestRedirect.")
    requestMirror: RequestMirror | None = Field(default=None, description="For RequestMirror.")
    cors: CORS | None = Field(default=None, description="For CORS.")

    @model_validator(mode="after")
    def _settings_match_type(self) -> Filter:
        wanted = _FILTER_FIELDS[self.type]
        if getattr(self, wanted) is None:
            raise ValueError(f"filter type {self.type} needs the field {wanted}")
        extra = [f for f in _FILTER_FIELDS.values() if f != wanted and getattr(self, f) is not None]
        if extra:
            raise ValueError(f"filter type {self.type} must not set {extra[0]}; set only {wanted}")
        return self


# A ConfigMap or Secret data key (Kubernetes' rule for both).
DATA_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"
PATTERN_HELP[DATA_KEY_PATTERN] = "a data key (letters, digits, '-', '_', '.'), e.g. ca.crt"


class CACertificateRef(Model):
    """A CA bundle (PEM certificates) to trust, in a ConfigMap or a Secret of the route's namespace."""

    kind: Literal["ConfigMap", "Secret"] = Field(
        default="ConfigMap",
        description="ConfigMap (default), or Secret (a kubernetes.io/tls Secret, as cert-manager writes).",
    )
    name: ObjectName = Field(description="Name of the ConfigMap or Secret, in the route's namespace.")
    key: Annotated[str, Field(min_length=1, max_length=253, pattern=DATA_KEY_PATTERN)] = Field(
        default="ca.crt", description="Data key holding the PEM bundle; default ca.crt."
    )


class BackendTLS(Model):
    """TLS to the backend (Gateway API BackendTLSPolicy): whom to trust and the name to verify.

    Exactly one of caCertificateRefs, wellKnownCACertificates and insecureSkipVerify says
    whom to trust; a verified backend needs hostname."""

    hostname: PreciseHostname | None = Field(
        default=None,
        description=(
            "The name the backend's certificate must carry, also sent as SNI; required unless "
            "insecureSkipVerify."
        ),
    )
    caCertificateRefs: list[CACertificateRef] = Field(
        default_factory=list, max_length=8, description="CA bundles to trust (ConfigMap or Secret)."
    )
    wellKnownCACertificates: Literal["System"] | None = Field(
        default=None, description="System: trust the dataplane's system root certificates."
    )
    insecureSkipVerify: bool = Field(
        default=False,
        description="Accept any certificate (encrypts, does not authenticate); must be set explicitly.",
    )

    @model_validator(mode="after")
    def _one_trust(self) -> BackendTLS:
        chosen = [
            name
            for name, set_ in (
                ("caCertificateRefs", bool(self.caCertificateRefs)),
                ("wellKnownCACertificates", self.wellKnownCACertificates is not None),
                ("insecureSkipVerify", self.insecureSkipVerify),
            )
            if set_
        ]
        if not chosen:
            raise ValueError(
                "say whom to trust: set caCertificateRefs (a CA bundle in a ConfigMap or Secret), "
                "wellKnownCACertificates: System, or insecureSkipVerify: true"
            )
        if len(chosen) > 1:
            raise ValueError(f"set one of {' and '.join(chosen)}, not both")
        if self.hostname is None and not self.insecureSkipVerify:
            raise ValueError(
                "hostname is required to verify the backend: the name its certificate must carry "
                "(also sent as SNI)"
            )
        return self


class HTTPBackendRef(BackendRef):
    """A Service port that receives traffic, with a relative weight and its own filters."""

    tls: BackendTLS | None = Field(
        default=None,
        description=(
            "Connect to this backend over TLS (BackendTLSPolicy semantics); needed for a Service "
            "port whose appProtocol is https or kubernetes.io/wss."
        ),
    )

    filters: list[Filter] = Field(
        default_factory=list,
        max_length=16,
        description=(
            "Applied only to requests sent to this backend, after the rule's: "
            "RequestHeaderModifier, ResponseHeaderModifier, URLRewrite, RequestMirror."
        ),
    )

    @model_validator(mode="after")
    def _backend_filters(self) -> HTTPBackendRef:
        for index, f in enumerate(self.filters):
            if f.type not in BACKEND_FILTERS:
                raise ValueError(
                    f"filters[{index}]: {f.type} cannot be set on a backendRef (a redirect or a CORS "
                    "answer is given before a backend is chosen); set it in the rule's filters"
                )
        _filters_once([f.type for f in self.filters])
        return self


COOKIE_NAME_PATTERN = r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]{1,128}$"
PATTERN_HELP[COOKIE_NAME_PATTERN] = "a cookie name (letters, digits and !#$%&'*+-.^_`|~)"
COOKIE_PATH_PATTERN = r"^/[\x21-\x3a\x3c-\x7e]*$"
PATTERN_HELP[COOKIE_PATH_PATTERN] = "a path starting with '/' of visible characters, no ';'"


class CookieConfig(Model):
    """The session cookie."""

    name: Annotated[str, Field(pattern=COOKIE_NAME_PATTERN)] | None = Field(
        default=None, description="Cookie name; default a name unique to the route rule."
    )
    path: Annotated[str, Field(max_length=1024, pattern=COOKIE_PATH_PATTERN)] = Field(
        default="/", description="Cookie Path attribute; default /."
    )
    lifetimeType: Literal["Session", "Permanent"] = Field(
        default="Session",
        description="Session (ends with the browser) or Permanent (Max-Age, needs absoluteTimeout).",
    )


class HeaderConfig(Model):
    """The session header: sent in responses, to be sent back in requests."""

    name: HeaderName = Field(description="Header name.")


class SessionPersistence(Model):
    """Keep a client on the endpoint that served it while that endpoint is healthy."""

    type: Literal["Cookie", "Header"] = Field(default="Cookie", description="Cookie (default) or Header.")
    cookie: CookieConfig | None = Field(default=None, description="For type Cookie.")
    header: HeaderConfig | None = Field(default=None, description="For type Header (required).")
    absoluteTimeout: Duration | None = Field(
        default=None, description="A session ends this long after it started; none when absent."
    )
    idleTimeout: Duration | None = Field(
        default=None, description="A session ends after this long without requests; none when absent."
    )

    @model_validator(mode="after")
    def _consistent(self) -> SessionPersistence:
        if self.type == "Cookie" and self.header is not None:
            raise ValueError("header is for type Header; set cookie (or nothing) for type Cookie")
        if self.type == "Header":
            if self.cookie is not None:
                raise ValueError("cookie is for type Cookie; set header for type Header")
            if self.header is None:
                raise ValueError("type Header needs header.name, the header that carries the session")
        if self.cookie is not None and self.cookie.lifetimeType == "Permanent" and not self.absoluteTimeout:
            raise ValueError("a Permanent cookie needs absoluteTimeout (its Max-Age)")
        for field in ("absoluteTimeout", "idleTimeout"):
            value = getattr(self, field)
            if value is not None and parse_duration(value) < 1:
                raise ValueError(f"{field} must be at least 1s")
        return self


def _filters_once(types: Sequence[str]) -> None:
    """Each filter type at most once (RequestMirror may repeat); redirect and rewrite exclusive."""
    for kind in sorted(set(types)):
        if kind != "RequestMirror" and types.count(kind) > 1:
            raise ValueError(f"filter {kind} appears {types.count(kind)} times; use it once")
    if "RequestRedirect" in types and "URLRewrite" in types:
        raise ValueError("a rule cannot both redirect (RequestRedirect) and rewrite (URLRewrite)")


class RouteTimeouts(Model):
    """Request timeouts; a timed-out request gets 504. 0s disables a timeout."""

    request: Duration | None = Field(
        default=None, description="Limit on the whole exchange, retries included; 0s: none."
    )
    backendRequest: Duration | None = Field(
        default=None, description="Limit on each attempt to a backend; 0s: none."
    )


# gRPC status codes by name (grpc/status.h); 0 (OK) is success, never retried.
GRPC_CODES = {
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "ABORTED": 10,
    "OUT_OF_RANGE": 11,
    "UNIMPLEMENTED": 12,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}


def _grpc_code(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 16:
        return value
    if isinstance(value, str) and value.upper() in GRPC_CODES:
        return GRPC_CODES[value.upper()]
    if isinstance(value, str) and value.isdigit() and 1 <= int(value) <= 16:
        return int(value)
    raise ValueError(
        f"{value!r} is not a gRPC status code to retry: a number 1-16 or a name such as UNAVAILABLE "
        "(0, OK, is success)"
    )


GRPCCode = Annotated[
    int,
    BeforeValidator(_grpc_code),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "description": "A gRPC status code: 1-16 or a name (UNAVAILABLE, RESOURCE_EXHAUSTED, ...).",
        }
    ),
]


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
    grpcCodes: list[GRPCCode] = Field(
        default_factory=list,
        max_length=16,
        description=(
            "gRPC status codes (numbers or names, e.g. UNAVAILABLE) that make a gRPC call be retried "
            "while nothing of its response has reached the client."
        ),
    )


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
    backendRefs: list[HTTPBackendRef] = Field(
        default_factory=list, max_length=16, description="Where matching requests go."
    )
    timeouts: RouteTimeouts | None = Field(default=None, description="Request timeouts.")
    retry: Retry | None = Field(default=None, description="Retry policy; none when absent.")
    rateLimit: RateLimit | None = Field(default=None, description="Local rate limit; none when absent.")
    loadBalancing: RouteLoadBalancing = Field(
        default_factory=RouteLoadBalancing, description="Endpoint choice within a backend."
    )
    sessionPersistence: SessionPersistence | None = Field(
        default=None, description="Keep each client on one endpoint (cookie or header); none when absent."
    )

    def service_refs(self) -> list[HTTPBackendRef | MirrorBackendRef]:
        """Every Service the rule names: its backends and its mirrors (the rule's own and
        its backends'). The compiler resolves these, and recompiles the rule when one changes."""
        filters = [*self.filters, *(f for ref in self.backendRefs for f in ref.filters)]
        mirrors = [f.requestMirror.backendRef for f in filters if f.requestMirror is not None]
        return [*self.backendRefs, *mirrors]

    @model_validator(mode="after")
    def _filters_consistent(self) -> RouteRule:
        types = [f.type for f in self.filters]
        _filters_once(types)
        if "RequestRedirect" in types and self.backendRefs:
            raise ValueError("a rule with RequestRedirect answers itself; remove its backendRefs")
        if "URLRewrite" in types:
            for index, ref in enumerate(self.backendRefs):
                if any(f.type == "URLRewrite" for f in ref.filters):
                    raise ValueError(
                        f"backendRefs[{index}]: URLRewrite is set on the rule and on the backendRef; "
                        "set it in one place"
                    )
        backend_filters = [f for ref in self.backendRefs for f in ref.filters]
        path_mods = [(f.urlRewrite or f.requestRedirect) for f in self.filters + backend_filters]
        replaces_prefix = any(
            m is not None and m.path is not None and m.path.type == "ReplacePrefixMatch" for m in path_mods
        )
        if replaces_prefix and any(m.grpc is not None or m.path.type != "PathPrefix" for m in self.matches):
            raise ValueError(
                "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match (not grpc)"
            )
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
    className: ClassName | None = Field(
        default=None,
        description=(
            "The install that serves this object (its operator's --class, the chart's className). "
            "Absent: the default class, bilayer. Installs of other classes ignore the object."
        ),
    )
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
    http2: bool | None = Field(
        default=None,
        description=(
            "HTTP/2 from clients on this port (ALPN h2 with TLS, prior knowledge without); default "
            "true, false: HTTP/1.1 only. The port's oldest route decides, as for tls."
        ),
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
