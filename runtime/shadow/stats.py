"""Confidence bounds on an agreement rate measured over a handful of shadow pairs.

A rate of 50/50 and one of 5/5 are both 100 %, but only the first says much. The Wilson score
interval keeps that difference, stays inside [0, 1] and behaves at 0 and n agreements, where the
normal approximation does not.
"""

from __future__ import annotations

import math

# Promotion asks "is agreement at least the target?": a one-sided question, so its bound is the
# one-sided 95 % one. With it, 52 agreeing pairs out of 52 clear a 0.95 target (the default
# Promotion.min_pairs is 50); the two-sided 1.96 would need 73.
Z_ONE_SIDED_95 = 1.645


def wilson_bounds(agreed: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """(lower, upper) Wilson score bounds of the rate ``agreed / n``; (0, 1) when nothing is known."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= agreed <= n:
        raise ValueError(f"agreed must be between 0 and n ({n}), not {agreed}")
    p = agreed / n
    z2 = z * z
    centre = p + z2 / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    denominator = 1 + z2 / n
    return max(0.0, (centre - spread) / denominator), min(1.0, (centre + spread) / denominator)
