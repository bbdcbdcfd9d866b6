"""Prometheus metrics. Label values are route names, slots, status codes (a known set; others folded
into their class, see `status_label`) and error codes: all bounded, never a raw path or a secret.

With several workers, prometheus-client's multiprocess mode aggregates across processes: the CLI
sets PROMETHEUS_MULTIPROC_DIR before the workers start. Gauges count live processes only: readiness
and expiry are the minimum over them (one worker without a token is a problem), the in-flight count
their sum. Each scrape first removes the gauge files of worker processes that have died
(`mark_process_dead`), so a killed worker's last values stop counting.
"""

from __future__ import annotations

import os
import weakref
from typing import TYPE_CHECKING, Literal, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

if TYPE_CHECKING:
    from gateway.credentials.base import CredentialStatus

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
# Per-process values aggregated across live workers: the minimum for readiness and expiry, the
# maximum for "this slot is in use / declared rejected", the sum for counts.
_MIN_MODE: Literal["livemin", "all"] = "livemin" if MULTIPROCESS else "all"
_MAX_MODE: Literal["livemax", "all"] = "livemax" if MULTIPROCESS else "all"
_SUM_MODE: Literal["livesum", "all"] = "livesum" if MULTIPROCESS else "all"

# Status codes that keep their own label value: those the gateway answers itself and those Azure ML's
# front end and inference server answer (each needs a different action). Any other code is counted
# under its class ("4xx"), so a misbehaving upstream cannot grow the label set.
KNOWN_STATUSES = frozenset(
    {200, 201, 202, 204, 206, 301, 302, 303, 304, 307, 308}
    | {400, 401, 403, 404, 405, 408, 409, 410, 411, 412, 413, 414, 415, 416, 422, 424, 429, 431, 499}
    | {500, 501, 502, 503, 504}
)
_STATUS_LABELS = {
    code: str(code) if code in KNOWN_STATUSES else f"{code // 100}xx" for code in range(100, 600)
}


def status_label(code: int) -> str:
    """The label value for an HTTP status: the code if known, else its class; "other" outside 100-599."""
    return _STATUS_LABELS.get(code, "other")


REQUESTS = Counter(
    "gateway_requests",
    "Requests handled, by route, the status the client got (known codes, else the class), the "
    "gateway's error code ('' when the upstream answered) and the caller (the callers the configuration "
    "names, `other` for the rest, `anonymous` without an identity).",
    ["route", "status", "error_code", "caller"],
)
UPSTREAM_RESPONSES = Counter(
    "gateway_upstream_responses",
    "Requests answered by the upstream, by route and the upstream's final status (known codes, else "
    "the class).",
    ["route", "status"],
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


class InFlight:
    """A route's requests in flight as a plain int, counted on the hot path without a lock and set on
    `gateway_in_flight_requests` by `flush_in_flight()` (before every scrape, and once a second while
    requests are served). One per route name, so a reload's new routes count with the old."""

    __slots__ = ("_gauge", "_published", "value")

    def __init__(self, route: str) -> None:
        self.value = 0
        self._published = 0
        self._gauge = IN_FLIGHT.labels(route)


_in_flight: dict[str, InFlight] = {}


def in_flight(route: str) -> InFlight:
    counter = _in_flight.get(route)
    if counter is None:
        counter = _in_flight[route] = InFlight(route)
    return counter


def flush_in_flight() -> None:
    for counter in list(_in_flight.values()):
        value = counter.value
        if value != counter._published:
            counter._published = value
            counter._gauge.set(value)
    _flush_admission()


class AdmissionCounts(Protocol):
    route: str
    in_flight: int

    @property
    def queued(self) -> int: ...


# Every route concurrency limit alive, the old ones of a reload included while their requests drain: their
# plain-int counts are summed per route into the admission gauges with the in-flight ones.
_admission: weakref.WeakSet[AdmissionCounts] = weakref.WeakSet()
_admission_published: dict[str, tuple[int, int]] = {}


def track_admission(limit: AdmissionCounts) -> None:
    _admission.add(limit)


def _flush_admission() -> None:
    totals: dict[str, tuple[int, int]] = dict.fromkeys(_admission_published, (0, 0))
    for limit in list(_admission):
        in_flight, queued = totals.get(limit.route, (0, 0))
        totals[limit.route] = (in_flight + limit.in_flight, queued + limit.queued)
    for route, counts in totals.items():
        if _admission_published.get(route) != counts:
            _admission_published[route] = counts
            ADMISSION_IN_FLIGHT.labels(route).set(counts[0])
            ADMISSION_QUEUED.labels(route).set(counts[1])


RETRIES = Counter("gateway_upstream_retries", "Upstream attempts repeated after a failure.", ["route"])
CREDENTIAL_REPLAYS = Counter(
    "gateway_credential_replays",
    "Requests sent again with another credential after the upstream refused one (auth.reject_statuses).",
    ["route"],
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
    "Seconds until the route's cached credential expires (absent for keys), as of the last update.",
    ["route"],
    multiprocess_mode=_MIN_MODE,
)
CREDENTIAL_EXPIRY_TIMESTAMP = Gauge(
    "gateway_credential_expiry_timestamp_seconds",
    "Unix time at which the route's cached token expires; 0 without one (absent for keys).",
    ["route"],
    multiprocess_mode=_MIN_MODE,
)
CREDENTIAL_READY = Gauge(
    "gateway_credential_ready",
    "1 when the route holds a credential believed valid.",
    ["route"],
    multiprocess_mode=_MIN_MODE,
)
ACTIVE_KEY_SLOT = Gauge(
    "gateway_active_key_slot",
    "1 for the key slot in use on each key route.",
    ["route", "slot"],
    multiprocess_mode=_MAX_MODE,
)
CREDENTIAL_REJECTIONS = Counter(
    "gateway_credential_rejections",
    "Requests in which the upstream refused a key slot or token (once per request; one may be "
    "provoked by a client).",
    ["route", "slot"],
)
CREDENTIAL_REJECTED = Gauge(
    "gateway_credential_rejected",
    "1 while a key slot or token is declared rejected (refused in auth.reject_after requests in a row).",
    ["route", "slot"],
    multiprocess_mode=_MAX_MODE,
)
UPSTREAM_EJECTIONS = Counter(
    "gateway_upstream_ejections", "Upstreams ejected by outlier detection.", ["route", "upstream"]
)
RELOADS = Counter("gateway_config_reloads", "Configuration reloads, by result.", ["result"])
ADMISSION_IN_FLIGHT = Gauge(
    "gateway_admission_in_flight",
    "Requests holding one of the route's concurrency slots (`limits.max_concurrent`).",
    ["route"],
    multiprocess_mode=_SUM_MODE,
)
ADMISSION_QUEUED = Gauge(
    "gateway_admission_queued",
    "Requests waiting for one of the route's concurrency slots.",
    ["route"],
    multiprocess_mode=_SUM_MODE,
)
ADMISSION_WAIT = Histogram(
    "gateway_admission_wait_seconds",
    "Time requests that found every slot taken spent in the queue (until admitted or refused).",
    ["route"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
ADMISSION_LIMIT = Gauge(
    "gateway_admission_limit",
    "The route's concurrency limit: fixed, or where `max_concurrent: auto` has it now (summed over "
    "gateway processes).",
    ["route"],
    multiprocess_mode=_SUM_MODE,
)
ADMISSION_BASELINE = Gauge(
    "gateway_admission_baseline_seconds",
    "With `max_concurrent: auto`: the upstream's no-load latency as measured (the lowest smoothed latency "
    "of the current window).",
    ["route"],
    multiprocess_mode=_MAX_MODE,
)
ADMISSION_REFUSALS = Counter(
    "gateway_admission_refusals",
    "Requests refused by admission control, by route, reason (route_busy, rate_limited) and caller "
    "(a configured caller name, else `other`).",
    ["route", "reason", "caller"],
)
LIMITS_STORE_FALLBACK = Gauge(
    "gateway_limits_store_fallback",
    "1 while the shared limits store (Redis) is unreachable or slow and per-caller limits are decided "
    "locally, divided by `expected_replicas`.",
    [],
    multiprocess_mode=_MAX_MODE,
)
INBOUND_REFUSALS = Counter(
    "gateway_inbound_refusals",
    "Requests the HTTP server refused while they arrived, before any route (no access line), by error code.",
    ["code"],
)


_TOKEN_KINDS = frozenset({"aad_token", "aml_token"})
_KEY_SLOTS = ("primary", "secondary")


def publish_credential(route: str, status: CredentialStatus) -> None:
    """Set the route's credential gauges from `status`."""
    CREDENTIAL_READY.labels(route).set(1 if status.ready else 0)
    if status.kind in _TOKEN_KINDS:
        # 0 once the token is gone, so an expired credential never shows its last countdown.
        CREDENTIAL_EXPIRY.labels(route).set(status.expires_in_s or 0)
        CREDENTIAL_EXPIRY_TIMESTAMP.labels(route).set(status.expires_at or 0)
        CREDENTIAL_REJECTED.labels(route, "token").set(1 if status.state == "rejected" else 0)
    elif status.kind == "key" and status.active_slot:
        rejected = status.extra.get("rejected_slots", ())
        for slot in _KEY_SLOTS:
            ACTIVE_KEY_SLOT.labels(route, slot).set(1 if slot == status.active_slot else 0)
            CREDENTIAL_REJECTED.labels(route, slot).set(1 if slot in rejected else 0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed worker its parent has not reaped yet is a zombie: dead all the same
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rpartition(")")[2].split()[:1] != ["Z"]
    except OSError:
        return True


def forget_dead_processes(directory: str) -> None:
    """Remove the live-gauge files of worker processes that no longer run."""
    from prometheus_client import multiprocess

    pids: set[int] = set()
    for name in os.listdir(directory):
        if name.startswith("gauge_live") and name.endswith(".db"):
            digits = name[:-3].rpartition("_")[2]
            if digits.isdigit():
                pids.add(int(digits))
    for pid in pids:
        if pid != os.getpid() and not _alive(pid):
            multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


def render() -> tuple[bytes, str]:
    flush_in_flight()
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        from prometheus_client import multiprocess

        forget_dead_processes(directory)
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
    multiprocess_mode=_MAX_MODE,
)
KEY_AGE = Gauge(
    "gateway_key_age_seconds",
    "Age of each key of a key route: since its Key Vault version was created, else since first seen.",
    ["route", "slot"],
    multiprocess_mode=_MAX_MODE,
)
KEY_ROTATIONS = Counter(
    "gateway_key_rotations",
    "New key values a key route picked up (a rotation reaching it), by slot.",
    ["route", "slot"],
)
SIGNING_KEY_FETCHES = Counter(
    "gateway_signing_key_fetches",
    "Reads of Entra ID's signing keys (inbound.entra_id), by reason (startup, refresh, unknown_kid) and "
    "result (ok, error).",
    ["reason", "result"],
)
SIGNING_KEYS_STALE = Gauge(
    "gateway_signing_keys_stale",
    "1 while the last read of Entra ID's signing keys failed (the last good keys stay in use).",
    multiprocess_mode=_MAX_MODE,
)
CALLER_TOKEN_REFUSALS = Counter(
    "gateway_caller_token_refusals",
    "Entra ID access tokens refused (401 caller_unauthenticated), by reason.",
    ["reason"],
)
