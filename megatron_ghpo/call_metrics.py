"""Combining the metrics of repeated calls within one step (e.g. a scorer called once per streamed batch).

A call returns ``{key: value}``. A value is a count, summed over calls, unless the call also returns
``key + MEAN_COUNT``: then the value is a mean over that many items and calls combine into the
weighted mean (a call with 0 items, whose mean is NaN, changes nothing). :func:`finished` drops
the count keys.
"""

from __future__ import annotations

import math

MEAN_COUNT = ":n"


def combine_call_metrics(total: dict[str, float], call: dict[str, float]) -> None:
    """Fold one call's metrics into ``total`` in place."""
    for key, value in call.items():
        if key.endswith(MEAN_COUNT):
            continue
        value = float(value)
        n_key = key + MEAN_COUNT
        if n_key not in call:
            total[key] = total.get(key, 0.0) + value
            continue
        n, seen = float(call[n_key]), total.get(n_key, 0.0)
        if n > 0 and not math.isnan(value):
            before = total.get(key, 0.0) if seen > 0 else 0.0
            total[key] = (before * seen + value * n) / (seen + n)
            total[n_key] = seen + n
        else:
            total.setdefault(key, float("nan"))
            total.setdefault(n_key, 0.0)


def finished(total: dict[str, float]) -> dict[str, float]:
    """The combined metrics without their count keys."""
    return {k: v for k, v in total.items() if not k.endswith(MEAN_COUNT)}
