"""Prometheus metrics. Label values are route names, slots, status classes and error codes:
all bounded and set by the configuration, never a raw path or a secret.

With several workers, prometheus-client's multiprocess mode aggregates across processes: the CLI
sets PROMETHEUS_MULTIPROC_DIR before the workers start.
"""

from __future__ import annotations

import os
from typing import Literal

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
# Per-process values aggregated across workers: the worst (max) for states, the sum for counts.
_GAUGE_MODE: Literal["max", "all"] = "max" if MULTIPROCESS else "all"
_SUM_MODE: Literal["livesum", "all"] = "livesum" if MULTIPROCESS else "all"

REQUESTS = Counter(
    "gateway_requests",
    "Requests handled, by route, status class and gateway error code ('' when the upstream answered).",
    ["route", "status_class", "error_code"],
)
UPSTREAM_LATENCY = Histogram(
    "gateway_upstream_duration_seconds",
    "Time from receiving a request to the upstream's response headers, all attempts included.",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
IN_FLIGHT = Gauge(
    "gateway_in_flight_requests", "Requests being handled.", ["route"], multiprocess_mode=_SUM_MODE
)
RETRIES = Counter("gateway_upstream_retries", "Upstream attempts repeated after a failure.", ["route"])
CREDENTIAL_REPLAYS = Counter(
    "gateway_credential_replays", "Requests sent again with another credential after a 401/403.", ["route"]
)
KEY_FAILOVERS = Counter(
    "gateway_key_failovers", "Switches of the active key, by new slot.", ["route", "slot"]
)
CREDENTIAL_REFRESHES = Counter(
    "gateway_credential_refreshes",
    "Credential acquisitions, by kind and result.",
    ["route", "kind", "result"],
)
CREDENTIAL_EXPIRY = Gauge(
    "gateway_credential_expiry_seconds",
    "Seconds until the route's cached credential expires (absent for keys).",
    ["route"],
    multiprocess_mode=_GAUGE_MODE,
)
CREDENTIAL_READY = Gauge(
    "gateway_credential_ready",
    "1 when the route holds a credential believed valid.",
    ["route"],
    multiprocess_mode=_GAUGE_MODE,
)
ACTIVE_KEY_SLOT = Gauge(
    "gateway_active_key_slot",
    "1 for the key slot in use on each key route.",
    ["route", "slot"],
    multiprocess_mode=_GAUGE_MODE,
)
UPSTREAM_EJECTIONS = Counter(
    "gateway_upstream_ejections", "Upstreams ejected by outlier detection.", ["route", "upstream"]
)
RELOADS = Counter("gateway_config_reloads", "Configuration reloads, by result.", ["result"])


def render() -> tuple[bytes, str]:
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


KEYVAULT_POLLS = Counter(
    "gateway_keyvault_polls",
    "Key Vault secret reads, by vault host, secret name and result.",
    ["vault", "secret", "result"],
)
KEYVAULT_SECRET_STALE = Gauge(
    "gateway_keyvault_secret_stale",
    "1 while the last read of the Key Vault secret failed (its last good value stays in use).",
    ["vault", "secret"],
    multiprocess_mode=_GAUGE_MODE,
)
KEY_AGE = Gauge(
    "gateway_key_age_seconds",
    "Age of each key of a key route: since its Key Vault version was created, else since first seen.",
    ["route", "slot"],
    multiprocess_mode=_GAUGE_MODE,
)
KEY_ROTATIONS = Counter(
    "gateway_key_rotations",
    "New key values a key route picked up (a rotation reaching it), by slot.",
    ["route", "slot"],
)
