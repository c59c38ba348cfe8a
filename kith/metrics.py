"""The Prometheus metrics kith exports (Sydent's `[general] prometheus_port`).

They live in prometheus_client's default registry, so they are per process: with several
workers each serves its own counters (see docs/decisions.md).  Label values are bounded:
`route` is the matched route's template, never the raw path.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from kith import __version__

UNMATCHED_ROUTE = "unmatched"

HTTP_REQUESTS = Counter(
    "kith_http_requests", "HTTP requests answered, by method, route and status",
    ["method", "route", "status"])
HTTP_REQUEST_DURATION = Histogram(
    "kith_http_request_duration_seconds", "Time to answer an HTTP request, by route",
    ["route"])
LOOKUP_ADDRESSES = Counter(
    "kith_lookup_addresses", "Addresses answered by lookups, by the source that answered",
    ["source"])
BINDS = Counter("kith_binds", "3PIDs bound")
UNBINDS = Counter("kith_unbinds", "3PIDs unbound")
ONBIND_DELIVERIES = Counter(
    "kith_onbind_deliveries", "onbind delivery attempts, by outcome (delivered, retry, gave_up)",
    ["outcome"])
BUILD_INFO = Gauge("kith_build_info", "The running kith's version (always 1)", ["version"])
BUILD_INFO.labels(version=__version__).set(1)
