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
# Replication: `peer` is a configured peer's name (bounded by the configuration); a push
# refused before its peer is known counts under its reason only.
REPLICATION_PUSHED = Counter(
    "kith_replication_pushed_associations", "Associations a peer acknowledged, by peer",
    ["peer"])
REPLICATION_RECEIVED = Counter(
    "kith_replication_received_associations", "Associations received and stored, by peer",
    ["peer"])
REPLICATION_REFUSED = Counter(
    "kith_replication_refused_pushes", "Pushes received and refused, by errcode", ["errcode"])
REPLICATION_ACKED_ID = Gauge(
    "kith_replication_acknowledged_id",
    "Id of the last own association each peer acknowledged (0: none)", ["peer"])
REPLICATION_LAG_CHANGES = Gauge(
    "kith_replication_lag_changes", "Own binds and unbinds a peer has not acknowledged yet",
    ["peer"])
REPLICATION_LAG_SECONDS = Gauge(
    "kith_replication_lag_seconds",
    "Age of the oldest own change a peer has not acknowledged (0: none waiting)", ["peer"])
REPLICATION_LAST_SUCCESS = Gauge(
    "kith_replication_last_success_timestamp_seconds",
    "When a push to the peer last succeeded (0: never)", ["peer"])
REPLICATION_LAST_ERROR = Gauge(
    "kith_replication_last_error_timestamp_seconds",
    "When a push to the peer last failed (0: never)", ["peer"])
BUILD_INFO = Gauge("kith_build_info", "The running kith's version (always 1)", ["version"])
BUILD_INFO.labels(version=__version__).set(1)
