"""Accuracy with a 95% confidence interval (Wilson score interval: sane at 0% and 100% and small N)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Rate:
    hits: int
    n: int

    @property
    def value(self) -> float:
        return self.hits / self.n if self.n else float("nan")

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        if self.n == 0:
            return float("nan"), float("nan")
        p, n = self.value, self.n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        lo, hi = max(0.0, centre - half), min(1.0, centre + half)
        # the interval always contains the estimate (rounding can push a bound past 0% or 100%)
        return min(lo, p), max(hi, p)

    def to_dict(self) -> dict:
        lo, hi = self.interval()
        return {"value": self.value, "hits": self.hits, "n": self.n, "ci95": [lo, hi]}

    def __str__(self) -> str:
        lo, hi = self.interval()
        return f"{100 * self.value:.1f} [{100 * lo:.0f}-{100 * hi:.0f}]"
