"""Percentiles for the benchmarks (each script says which it reports)."""

import math


def percentile(values, p):
    """The nearest-rank percentile: a value that was measured."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def interpolated_percentile(values, q):
    """Linear interpolation between closest ranks (numpy's default); None if empty."""
    ordered = sorted(values)
    if not ordered:
        return None
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
