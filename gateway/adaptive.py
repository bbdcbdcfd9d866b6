"""`max_concurrent: auto`: a concurrency limit that follows the upstream's capacity.

An additive-increase / multiplicative-decrease controller in the style of Netflix concurrency-limits
(AIMD, Gradient2) and Envoy's adaptive concurrency filter, fed one sample per upstream answer and judging
latency once per round trip, over the batch of answers that round trip brought (at least
`min_batch`, so one slow answer is not a trend):

- **Baseline**: the upstream's no-load latency, the lowest batch median seen; measured again in every
  window of `baseline_window_s`, so a model that became slower (or faster) moves the baseline with it.
- **Grow** by one request per `limit` answers (one per round trip) while the last batch stayed within
  `tolerance` x baseline and the limit is in use: a limit nobody reaches proves nothing about capacity.
- **Shrink** multiplicatively, once per congestion event, when the upstream says it is full (429, 503,
  408, 504: Azure ML answers 429 beyond `2 x max_concurrent_requests_per_instance x instances` and 503
  while scaling), or when two batches in a row came back slower than `tolerance` x baseline at their
  75th percentile (the endpoint queues; a single slow round trip is as often the network or the host).
  A congestion event is one epoch: answers to requests admitted before the last decrease do not count
  again, so the burst of 429s one overshoot produces costs one step, not one per 429.
- **Hold**: after a decrease the limit grows back freely to one below where the congestion happened, and
  waits `hold_s` before probing that level again, so a fixed-capacity endpoint sees one probe (one 429,
  which the replay policy retries) per `hold_s`, not one per round trip.

Nothing here reads the wall clock except through `clock`, so tests drive it with a fake one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from gateway import metrics

# Upstream answers that mean "no more": throttled, overloaded or scaling, timed out.
DROP_STATUSES = frozenset({408, 429, 503, 504})


class AdaptiveLimit:
    """The limit of one route. `limit` is the current value; `sample()` is called for every upstream answer
    of a request admitted at `epoch` (read `epoch` when the request is admitted)."""

    def __init__(
        self,
        route: str,
        *,
        min_limit: int,
        max_limit: int,
        clock: Callable[[], float] = time.monotonic,
        tolerance: float = 1.5,
        backoff: float = 0.9,
        min_batch: int = 8,
        baseline_window_s: float = 30.0,
        hold_s: float = 10.0,
    ) -> None:
        if not 1 <= min_limit <= max_limit:
            raise ValueError(f"need 1 <= min_limit ({min_limit}) <= max_limit ({max_limit})")
        self.route = route
        self.min_limit = min_limit
        self.max_limit = max_limit
        self.limit = min_limit
        self.baseline_s: float | None = None
        self.epoch = 0
        self._clock = clock
        self._tolerance = tolerance
        self._backoff = backoff
        self._min_batch = min_batch
        self._window_s = baseline_window_s
        self._hold_s = hold_s
        self._estimate = float(min_limit)
        self._batch: list[float] = []
        self._slow_batches = 0
        self._window_min: float | None = None
        self._window_ends = clock() + baseline_window_s
        self._ceiling: float | None = None
        self._hold_until = 0.0
        self._limit_gauge = metrics.ADMISSION_LIMIT.labels(route)
        self._baseline_gauge = metrics.ADMISSION_BASELINE.labels(route)
        self._limit_gauge.set(self.limit)

    def sample(self, latency_s: float, status: int, epoch: int, in_flight: int) -> None:
        """One upstream answer: `status` after `latency_s` (request sent to response head), for a request
        admitted at `epoch`, with `in_flight` requests holding slots (this one included)."""
        if status in DROP_STATUSES:
            self._decrease(epoch, self._backoff)
            return
        if status >= 400 or not latency_s >= 0.0 or epoch != self.epoch:
            # An error says nothing about capacity (a refused key is as fast as a full endpoint); an
            # answer to a request admitted before the last decrease says nothing about the new limit.
            return
        batch = self._batch
        batch.append(latency_s)
        if len(batch) >= max(self.limit, self._min_batch):
            self._judge_batch()
            if self.epoch != epoch:
                return
        if self._slow_batches or self.baseline_s is None or in_flight < self.limit:
            return
        estimate = self._estimate
        ceiling = self._ceiling
        if ceiling is not None and estimate + 1.0 >= ceiling and self._clock() < self._hold_until:
            return
        estimate = min(float(self.max_limit), estimate + 1.0 / estimate)
        if ceiling is not None and estimate >= ceiling:
            self._ceiling = None  # past the old congestion point without congestion: the endpoint grew
        self._estimate = estimate
        self._publish()

    def _judge_batch(self) -> None:
        batch = sorted(self._batch)
        self._batch = []
        median = batch[len(batch) // 2]
        slow = batch[(3 * len(batch)) // 4]
        self._track_baseline(median)
        baseline = self.baseline_s
        assert baseline is not None
        if slow <= baseline * self._tolerance:
            self._slow_batches = 0
            return
        self._slow_batches += 1
        if self._slow_batches >= 2:
            self._decrease(self.epoch, max(0.5, min(self._backoff, baseline * self._tolerance / slow)))

    def _track_baseline(self, median: float) -> None:
        now = self._clock()
        if now >= self._window_ends:
            # A new window: the baseline becomes what the last one measured (a slower model raises it).
            if self._window_min is not None:
                self.baseline_s = self._window_min
                self._baseline_gauge.set(self._window_min)
            self._window_min = None
            self._window_ends = now + self._window_s
        if self._window_min is None or median < self._window_min:
            self._window_min = median
        if self.baseline_s is None or median < self.baseline_s:
            self.baseline_s = median
            self._baseline_gauge.set(median)

    def _decrease(self, epoch: int, factor: float) -> None:
        if epoch != self.epoch:
            return
        self.epoch += 1
        self._ceiling = self._estimate
        self._estimate = max(float(self.min_limit), math.floor(self._estimate * factor))
        self._batch = []
        self._slow_batches = 0
        self._hold_until = self._clock() + self._hold_s
        self._publish()

    def _publish(self) -> None:
        limit = int(self._estimate)
        if limit != self.limit:
            self.limit = limit
            self._limit_gauge.set(limit)
