"""Exponential backoff with full jitter, for anything that retries a failed call in the background."""

from __future__ import annotations

import math
import random

# Retry-After values above this are treated as this: an hour without trying is long enough. A value
# that is not a finite number is no Retry-After at all.
MAX_RETRY_AFTER_S = 3600.0


class Backoff:
    """Delays that grow from `base_s` to `cap_s`, each drawn uniformly below the ceiling (full jitter).

    Full jitter spreads the retries of many gateway processes that failed at the same moment, so a
    recovering identity provider is not hit by all of them at once. A server's Retry-After is a floor.
    """

    def __init__(self, base_s: float = 1.0, cap_s: float = 60.0, rng: random.Random | None = None) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self, retry_after: float | None = None) -> float:
        """Count one more failure and return how long to wait before the next attempt."""
        self.failures += 1
        ceiling = min(self.cap_s, self.base_s * 2 ** min(self.failures - 1, 32))
        delay = self._rng.uniform(0.0, ceiling)
        if retry_after is not None and math.isfinite(retry_after) and retry_after > 0:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
        return delay

    def reset(self) -> None:
        self.failures = 0
