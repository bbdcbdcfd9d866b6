"""The model behind the emulated deployment: a nearest-centroid classifier over the Iris class means.

It is deliberately real (deterministic, cheap, input-validating) so that end-to-end tests can assert on
actual predictions and malformed input fails the way a scoring script's `run()` would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["CENTROIDS", "LABELS", "predict"]

# Per-class means of (sepal length, sepal width, petal length, petal width) in cm over the 50 samples of
# each species in Fisher's Iris dataset.
CENTROIDS: dict[str, tuple[float, float, float, float]] = {
    "setosa": (5.006, 3.428, 1.462, 0.246),
    "versicolor": (5.936, 2.770, 4.260, 1.326),
    "virginica": (6.588, 2.974, 5.552, 2.026),
}
LABELS: tuple[str, ...] = tuple(CENTROIDS)
N_FEATURES = 4


def _is_number(value: object) -> bool:
    # bool is an int subclass, but `true` in a JSON payload is a client bug, not a measurement.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _validate(rows: object) -> list[Sequence[float]]:
    if not isinstance(rows, list):
        raise ValueError(f"expected a list of rows, got {type(rows).__name__}")
    for index, row in enumerate(rows):
        if not isinstance(row, list | tuple) or len(row) != N_FEATURES:
            raise ValueError(f"row {index}: expected a list of {N_FEATURES} numbers")
        if not all(_is_number(value) for value in row):
            raise ValueError(f"row {index}: every feature must be a finite number")
    return rows


def predict(rows: list[list[float]]) -> list[str]:
    """Return the species label of the nearest class mean (Euclidean distance) for each row.

    Raises ValueError unless `rows` is a list of 4-number rows.
    """
    labels: list[str] = []
    for row in _validate(rows):
        best = min(LABELS, key=lambda label: math.dist(row, CENTROIDS[label]))
        labels.append(best)
    return labels
