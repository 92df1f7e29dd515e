"""The `bilayer` command."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
from pathlib import Path
from typing import Any

from dataplane import eventloop, logs

from . import crdgen
from .compiler import Compiled, compile_snapshot
from .files import FileSource
from .resources.classes import DEFAULT_CLASS, valid_class

DESCRIPTION = """\
Bilayer programs L4 (TCP) and L7 (HTTP) proxies from two resources, L4Listener and
L7Route. In a cluster the operator compiles them and pushes the routing table to the
dataplane pods; without a cluster, `bilayer run -f DIR` does the same from YAML files.
"""

EPILOG = """\
examples:
  bilayer run -f examples/quickstart         serve the quick start; admin API on 127.0.0.1:9901
  bilayer validate -f routes/                check files; exit 1 on an invalid object or none
  bilayer validate -f routes/shop.yaml       check one file
  bilayer explain -f routes/ --host api.example.com --path /v2/users --header x-canary=true
  bilayer crds --output crds/                write the CustomResourceDefinitions
"""


FILE_HELP = (
    "a folder of Kubernetes objects (every *.yaml, *.yml and *.json directly in it; "
    "subfolders are not read) or one such file"
)


def version() -> str:
    try:
        return importlib.metadata.version("bilayer")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown"


def _token(args: argparse.Namespace) -> str | None:
    if getattr(args, "admin_token_file", None):
        return Path(args.admin_token_file).read_text().strip() or None
    return os.environ.get("BILAYER_ADMIN_TOKEN") or None


def _compile_dir(directory: str, class_name: str) -> tuple[FileSource, Compiled]:
    source = FileSource(Path(directory), class_name)
    source.reload()
    return source, compile_snapshot(source.snapshot())


def cmd_validate(args: argparse.Namespace) -> int:
    source, compiled = _compile_dir(args.file, args.class_name)
    errors = list(source.problems)
    warnings: list[str] = []
    for key, conds in compiled.statuses.items():
        for cond in conds:
            if cond.status == "False":
                line = f"{key}: {cond.type} {cond.reason}: {cond.message}"
                (errors if cond.type == "Accepted" else warnings).append(line)
    for line in errors:
        print(f"error: {line}")
    for line in warnings:
        print(f"warning: {line}")
    if source.other_classes:
        print(
            f"note: {len(source.other_classes)} objects of other classes not checked "
            f"(className other than {args.class_name}; --class NAME checks those)"
        )
    for folder in source.subfolders():
        print(f"note: {folder}/ not read: -f reads the files directly in the folder; pass it on its own")
    count = len(compiled.statuses)
    if not count and not errors:
        print(f"error: no L4Listener or L7Route in {args.file} (read: *.yaml, *.yml, *.json)")
        return 1
    if errors or (args.strict and warnings):
        return 1
    print(f"ok: {count} objects valid" + (f", {len(warnings)} warnings" if warnings else ""))
    return 0


def _redacted(document: dict[str, Any]) -> dict[str, Any]:
    for listener in document.get("listeners", {}).values():
        for cert in ((listener.get("l7") or {}).get("tls") or {}).get("certificates", []):
            cert["keyPem"] = "<redacted: use --show-secrets>"
    return document


def cmd_compile(args: argparse.Namespace) -> int:
    source, compiled = _compile_dir(args.file, args.class_name)
    for problem in source.problems:
        print(f"warning: {problem}", file=sys.stderr)
    if args.statuses:
        document: dict[str, Any] = {
            str(key): [c.model_dump(exclude_none=True) for c in conds]
            for key, conds in compiled.statuses.items()
        }
    else:
        document = compiled.table.to_dict()
        if not args.show_secrets:
            document = _redacted(document)
    print(json.dumps(document, indent=2, sort_keys=True))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from .explain import explain

    headers = {}
    for item in args.header:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--header {item!r}: write it as name=value")
        headers[name.strip().lower()] = value
    _, compiled = _compile_dir(args.file, args.class_name)
    answer = explain(
        compiled.table, args.host, args.path, method=args.method, headers=headers, port=args.port
    )
    if args.json:
        print(json.dumps(answer.__dict__, indent=2))
    else:
        print("\n".join(answer.lines()))
    return 0


def cmd_crds(args: argparse.Namespace) -> int:
    if args.output:
        for path in crdgen.write(Path(args.output)):
            print(f"wrote {path}")
        return 0
    print("---\n".join(crdgen.render(d) for d in crdgen.all_crds().values()), end="")
    return 0


def _settings(args: argparse.Namespace) -> Any:
    from dataplane.runtime import Settings

    return Settings(
        address=args.address,
        state_dir=Path(args.state_dir) if args.state_dir else None,
        drain_grace=args.drain_grace,
        access_log=not args.no_access_log,
        access_log_sample=args.access_log_sample,
        connection_log=not args.no_access_log,
        route_metrics=args.route_metrics,
        max_body_size=args.max_body_size,
        header_timeout=args.header_timeout,
        keepalive_timeout=args.keepalive_timeout,
        idle_timeout=args.idle_timeout,
        min_body_rate=args.min_body_rate,
        max_header_bytes=args.max_header_bytes,
        max_headers=args.max_headers,
        connect_timeout=args.connect_timeout,
        via=args.via,
        otlp_endpoint=args.otlp_endpoint,
        trace_sampling=args.trace_sampling,
        workers=args.workers,
        worker_sockets=args.worker_sockets,
        worker_apply_timeout=args.worker_apply_timeout,
    )


def cmd_run(args: argparse.Namespace) -> int:
    from .filemode import run_files

    logs.setup(args.log_level)
    eventloop.raise_fd_limit()
    eventloop.run(
        run_files(
            Path(args.file),
            _settings(args),
            admin_host=args.admin_address,
            admin_port=args.admin_port,
            token=_token(args),
            class_name=args.class_name,
        )
    )
    return 0


def cmd_dataplane(args: argparse.Namespace) -> int:
    from dataplane.server import run_dataplane

    logs.setup(args.log_level)
    eventloop.raise_fd_limit()
    eventloop.run(
        run_dataplane(
            _settings(args),
            admin_host=args.admin_address,
            admin_port=args.admin_port,
            token=_token(args),
            metrics_port=args.metrics_port or None,
        )
    )
    return 0


def cmd_operator(args: argparse.Namespace) -> int:
    from .cluster import OperatorSettings
    from .leader import check_timing
    from .main import run

    try:
        # Checked here too: the Leader is made after the first listing, minutes into a start.
        check_timing(args.lease_duration, args.renew_deadline, args.retry_period)
    except ValueError as err:
        raise SystemExit(f"--lease-duration, --renew-deadline, --retry-period: {err}") from None
    logs.setup(args.log_level)
    labels = dict(item.split("=", 1) for item in args.dataplane_selector.split(",") if "=" in item)
    settings = OperatorSettings(
        namespace=args.namespace,
        class_name=args.class_name,
        watch_namespaces=[n for n in args.watch_namespaces.split(",") if n],
        dataplane_labels=labels,
        dataplane_service=args.dataplane_service,
        admin_port=args.admin_port,
        admin_token=_token(args),
        admin_token_secret=args.admin_token_secret or None,
        resync=args.resync,
        holdoff=args.holdoff,
        max_holdoff=args.max_holdoff,
        leader_election=not args.no_leader_election,
        lease_name=args.lease_name,
        lease_seconds=args.lease_duration,
        renew_deadline=args.renew_deadline,
        retry_period=args.retry_period,
        health_address=args.health_address,
        health_port=args.health_port or None,
        api_qps=args.api_qps,
        api_burst=args.api_burst,
    )
    if settings.admin_token is None and settings.admin_token_secret is None:
        raise SystemExit(
            "the operator needs the dataplanes' admin token: set BILAYER_ADMIN_TOKEN, "
            "--admin-token-file or --admin-token-secret"
        )
    eventloop.run(run(settings))
    return 0


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def _otlp_endpoint(text: str) -> str:
    from dataplane.tracing import traces_url

    try:
        traces_url(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _class_name(text: str) -> str:
    if not valid_class(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a class name: use a DNS label such as internal")
    return text


def _add_class_option(p: argparse.ArgumentParser, served: str) -> None:
    p.add_argument(
        "--class",
        dest="class_name",
        type=_class_name,
        default=DEFAULT_CLASS,
        metavar="NAME",
        help=f"{served} only the L4Listeners and L7Routes whose spec.className is NAME, and those "
        f"without className when NAME is {DEFAULT_CLASS} (default {DEFAULT_CLASS})",
    )


def _add_serving_options(p: argparse.ArgumentParser, address: str, admin_address: str) -> None:
    p.add_argument("--address", default=address, help=f"address the listeners bind (default {address})")
    p.add_argument(
        "--admin-address",
        default=admin_address,
        help=f"address of the admin API (default {admin_address})",
    )
    p.add_argument("--admin-port", type=int, default=9901, help="port of the admin API (default 9901)")
    p.add_argument(
        "--admin-token-file",
        help="file holding the admin API bearer token (or set BILAYER_ADMIN_TOKEN); "
        "required unless the admin API is bound to loopback",
    )
    p.add_argument("--state-dir", help="where the last good table is saved and loaded at start")
    p.add_argument(
        "--drain-grace",
        type=float,
        default=30.0,
        help="seconds a removed listener's connections may drain before being closed (default 30)",
    )
    p.add_argument("--no-access-log", action="store_true", help="no per-request / per-connection log lines")
    p.add_argument(
        "--access-log-sample",
        type=float,
        default=1.0,
        help="fraction of requests and connections logged (0-1)",
    )
    p.add_argument(
        "--route-metrics",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="export the per route rule metrics (bilayer_l7_route_*: responses, latency histogram, "
        "retries, 429s), one series set per rule; --no-route-metrics keeps the per port and per "
        "cluster ones only, for tables with many rules (default on)",
    )
    p.add_argument(
        "--max-body-size",
        type=int,
        default=0,
        help="largest request body in bytes, 413 above it (0: no limit)",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="seconds for a request's head (first byte to last header), its trailers and a TLS "
        "handshake; 408 after (default 10)",
    )
    p.add_argument(
        "--keepalive-timeout",
        type=float,
        default=60.0,
        help="seconds an idle client connection stays open between requests (default 60)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=60.0,
        help="seconds without a byte either way before an HTTP exchange is ended (504 while waiting "
        "for the backend) or a WebSocket tunnel is closed; also how long a client that stops "
        "reading its response is waited for (default 60)",
    )
    p.add_argument(
        "--min-body-rate",
        type=int,
        default=240,
        help="bytes per second a request body must keep up after its first 5 seconds, 408 below "
        "it (slow-body attacks; 0: no minimum; default 240)",
    )
    p.add_argument(
        "--max-header-bytes",
        type=int,
        default=60 * 1024,
        help="largest request or response head, and trailer section, in bytes: 431 for a "
        "client's, 502 for a backend's (default 61440)",
    )
    p.add_argument(
        "--max-headers",
        type=int,
        default=100,
        help="most header fields in a request or response head (default 100)",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=5.0,
        help="seconds to connect to an HTTP endpoint (default 5)",
    )
    p.add_argument("--via", action="store_true", help="add Via: 1.1 bilayer to forwarded requests")
    p.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        type=_otlp_endpoint,
        help="trace HTTP requests and export the spans to this OTLP/HTTP collector: its base URL "
        "(http://collector:4318, /v1/traces is added) or a full traces URL; off by default. "
        "OTEL_EXPORTER_OTLP_HEADERS and the other OTEL_EXPORTER_OTLP_* variables apply",
    )
    p.add_argument(
        "--trace-sampling",
        metavar="RATIO",
        type=_ratio,
        default=0.01,
        help="share of the traces started at the proxy that are recorded, 0-1; a request whose "
        "traceparent is sampled is always recorded (default 0.01)",
    )
    p.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N|auto",
        help="processes serving the listeners: N, or auto for the CPUs this process may use (its "
        "cgroup's cpu.max quota rounded up, else its CPU affinity). With more than one, this "
        "process supervises them: it serves the admin API, applies each table in every worker "
        "before answering, runs the health checks once and sums the workers' /metrics; a "
        "worker that exits is started again. Route rate limits count for the pod; "
        "maxConnections is split over the workers; L4 client limits count per worker "
        "(README, Workers). 1: one process, no supervisor (default 1)",
    )
    p.add_argument(
        "--worker-sockets",
        choices=["reuseport", "shared"],
        default="reuseport",
        help="how connections reach the workers: reuseport, a socket per worker with SO_REUSEPORT "
        "(the kernel spreads connections evenly; set net.ipv4.tcp_migrate_req=1 so that those "
        "queued on an exiting worker's socket move to another); shared, one socket bound here "
        "and handed to every worker (nothing queued is lost, but the spread is uneven) "
        "(default reuseport)",
    )
    p.add_argument(
        "--worker-apply-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="with workers: how long each may take to apply a table; one slower fails the push "
        "(503, the pod keeps claiming its table) and is started again (default 60)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _workers(text: str) -> int:
    from dataplane.workers import parse_workers

    try:
        return parse_workers(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="bilayer",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    root.add_argument("--version", action="version", version=f"bilayer {version()}")
    sub = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "run",
        help="serve the objects in a folder (the file provider)",
        description="Compile every *.yaml, *.yml and *.json in PATH (a folder, or one file), "
        "serve the table, and recompile within a second when a file changes.",
    )
    p.add_argument("-f", "--file", required=True, metavar="PATH", help=FILE_HELP)
    _add_serving_options(p, address="0.0.0.0", admin_address="127.0.0.1")
    _add_class_option(p, "serve")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "validate",
        help="check the objects in a folder; exit 1 on errors",
        description="Print one line per problem: the object, the field and what is allowed.",
    )
    p.add_argument("-f", "--file", required=True, metavar="PATH", help=FILE_HELP)
    p.add_argument("--strict", action="store_true", help="also fail on warnings (unresolved references)")
    _add_class_option(p, "check")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "compile",
        help="print the routing table compiled from a folder",
        description="Print the routing table as JSON (private keys redacted).",
    )
    p.add_argument("-f", "--file", required=True, metavar="PATH", help=FILE_HELP)
    p.add_argument("--statuses", action="store_true", help="print every object's conditions instead")
    p.add_argument("--show-secrets", action="store_true", help="include TLS private keys")
    _add_class_option(p, "compile")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser(
        "explain",
        help="show which route and backend a request would take, and why",
        description="Name the listener, route, rule and backend a request takes, and "
        "the higher-precedence rules considered first with why each did not match.",
    )
    p.add_argument("-f", "--file", required=True, metavar="PATH", help=FILE_HELP)
    p.add_argument("--host", required=True, help="Host header (port ignored)")
    p.add_argument("--path", required=True, help="request target: path and optional ?query")
    p.add_argument("--method", default="GET")
    p.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a request header (repeatable)",
    )
    p.add_argument("--port", type=int, help="listener port (needed when several ports serve HTTP)")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_class_option(p, "explain with")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("crds", help="print or write the CustomResourceDefinitions")
    p.add_argument("--output", metavar="DIR", help="write one file per CRD into DIR instead of printing")
    p.set_defaults(func=cmd_crds)

    p = sub.add_parser(
        "operator",
        help="watch the cluster and program the dataplane pods",
        description="Watch L4Listeners, L7Routes, Services, EndpointSlices and TLS Secrets; compile one "
        "table; push it to every running dataplane pod; write status. Two replicas: the Lease holder acts.",
    )
    p.add_argument(
        "--namespace",
        default=os.environ.get("POD_NAMESPACE", "bilayer-system"),
        help="namespace of the dataplane pods, their Service and the leader Lease "
        "(default: $POD_NAMESPACE or bilayer-system)",
    )
    p.add_argument(
        "--watch-namespaces", default="", metavar="NS,NS", help="watch only these namespaces (default: all)"
    )
    p.add_argument(
        "--dataplane-selector",
        default="app.kubernetes.io/name=bilayer,app.kubernetes.io/component=dataplane",
        metavar="K=V,K=V",
        help="labels of the dataplane pods",
    )
    p.add_argument(
        "--dataplane-service", default="bilayer-dataplane", help="Service whose ports follow the listeners"
    )
    p.add_argument("--admin-port", type=int, default=9901, help="dataplane admin port when a pod names none")
    p.add_argument(
        "--admin-token-file", help="file with the dataplanes' admin token (or BILAYER_ADMIN_TOKEN)"
    )
    p.add_argument(
        "--admin-token-secret",
        metavar="NAME",
        help="when neither of those gives a token: the Secret in --namespace holding it under "
        "`token`; the first operator to start writes a random one there if it holds none",
    )
    p.add_argument(
        "--resync", type=float, default=60.0, help="seconds between checks of what each pod serves"
    )
    p.add_argument(
        "--holdoff",
        type=float,
        default=0.01,
        metavar="SECONDS",
        help="compile this long after the last change, if no other change comes (default 0.01)",
    )
    p.add_argument(
        "--max-holdoff",
        type=float,
        default=0.5,
        metavar="SECONDS",
        help="but never later than this after the first change of a batch (default 0.5)",
    )
    p.add_argument(
        "--no-leader-election", action="store_true", help="act without holding the Lease (a single replica)"
    )
    p.add_argument("--lease-name", default="bilayer-operator", help="the Lease whose holder acts")
    p.add_argument(
        "--lease-duration",
        type=int,
        default=15,
        metavar="SECONDS",
        help="a standby takes the Lease after it has not changed for this long, by its own clock "
        "(default 15)",
    )
    p.add_argument(
        "--renew-deadline",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="the leader steps down when it could not renew the Lease for this long (default 10)",
    )
    p.add_argument(
        "--retry-period",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="seconds between the leader's renewals and the standby's tries (default 2); the "
        "lease duration must exceed the renew deadline, and that 1.2 retry periods",
    )
    p.add_argument(
        "--health-address",
        default="0.0.0.0",
        help="address of /healthz, /readyz and /metrics (default 0.0.0.0)",
    )
    p.add_argument(
        "--health-port",
        type=int,
        default=9902,
        help="port of /healthz, /readyz and /metrics (default 9902; 0: none)",
    )
    p.add_argument(
        "--api-qps",
        type=float,
        default=100.0,
        help="API calls a second, on average (watches excluded; default 100)",
    )
    p.add_argument("--api-burst", type=int, default=200, help="API calls allowed in a burst (default 200)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    _add_class_option(p, "serve")
    p.set_defaults(func=cmd_operator)

    p = sub.add_parser(
        "dataplane",
        help="run a dataplane that the operator programs through its admin API",
        description="Serve tables pushed to PUT /v1/table; loads the saved table at start.",
    )
    _add_serving_options(p, address="0.0.0.0", admin_address="0.0.0.0")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=9903,
        help="read-only port on the admin address serving /metrics, /healthz and /readyz without "
        "the admin token, for scrapers and probes; table writes stay on the admin port "
        "(default 9903; 0: none)",
    )
    p.set_defaults(func=cmd_dataplane)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
