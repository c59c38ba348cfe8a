"""The Prometheus metrics kith exports (Sydent's `[general] prometheus_port`).

With one process they live in prometheus_client's default registry.  With several
workers every process writes them to a shared directory (kith.metrics_multiprocess) and
a scrape sums the counters over all workers; each gauge says how its workers' values
combine (`multiprocess_mode`): a value read from the shared store is the most recent
one, a per-process state (a breaker) the largest of the live workers.  Label values are
bounded: `route` is the matched route's template, never the raw path.
"""

from __future__ import annotations

from typing import Final

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
# Gauges of the shared store: whichever worker read it last is right.
STORED: Final = "livemostrecent"
REPLICATION_ACKED_ID = Gauge(
    "kith_replication_acknowledged_id",
    "Id of the last own association each peer acknowledged (0: none)", ["peer"],
    multiprocess_mode=STORED)
REPLICATION_LAG_CHANGES = Gauge(
    "kith_replication_lag_changes", "Own binds and unbinds a peer has not acknowledged yet",
    ["peer"], multiprocess_mode=STORED)
REPLICATION_LAG_SECONDS = Gauge(
    "kith_replication_lag_seconds",
    "Age of the oldest own change a peer has not acknowledged (0: none waiting)", ["peer"],
    multiprocess_mode=STORED)
REPLICATION_LAST_SUCCESS = Gauge(
    "kith_replication_last_success_timestamp_seconds",
    "When a push to the peer last succeeded (0: never)", ["peer"], multiprocess_mode=STORED)
REPLICATION_LAST_ERROR = Gauge(
    "kith_replication_last_error_timestamp_seconds",
    "When a push to the peer last failed (0: never)", ["peer"], multiprocess_mode=STORED)
ONBIND_QUEUE = Gauge(
    "kith_onbind_queue", "onbind deliveries in the store, by state (pending, gave_up)",
    ["state"], multiprocess_mode=STORED)
ONBIND_OLDEST_PENDING = Gauge(
    "kith_onbind_oldest_pending_age_seconds",
    "Age of the oldest onbind delivery still pending (0: none)", multiprocess_mode=STORED)
BINDINGS = Gauge(
    "kith_bindings", "Live bindings lookups answer from, by source (local, ldap)",
    ["source"], multiprocess_mode=STORED)
LDAP_LAST_SYNC = Gauge(
    "kith_ldap_last_sync_timestamp_seconds",
    "When the LDAP directory was last synced successfully (0: not yet)",
    multiprocess_mode="livemax")
# Each worker has its own breakers: one open is enough to say the dependency is failing.
BREAKER_OPEN = Gauge(
    "kith_breaker_open",
    "1 while the circuit breaker of a dependency (ldap, upstream) is open, else 0",
    ["dependency"], multiprocess_mode="livemax")
BUILD_INFO = Gauge("kith_build_info", "The running kith's version (always 1)", ["version"],
                   multiprocess_mode="max")
BUILD_INFO.labels(version=__version__).set(1)
