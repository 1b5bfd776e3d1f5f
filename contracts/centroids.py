"""A task's place in embedding space: its centroid, and the cosine a request needs to match it.

The training box computes both when a task is accepted (from the task's own traces) and the
device compares each request's embedding to them, so both sides share this one arithmetic.

How the threshold is chosen (``calibrate_threshold``): let ``low`` be the ``quantile`` (2 %) of
the members' cosines, so all but the few least typical members clear it. Without other calls the
threshold is ``low - margin``, room for paraphrases the traces did not show. With other calls
(the requests that could be mistaken for the task at match time: other steps of the same agent,
planning; for a tool-calling task only those that offer tools, since the device never matches a
request without tools to one) let ``high`` be their ``1 - quantile`` quantile. When ``high <
low`` the threshold is the midpoint of that gap, as far from the task's own calls as from the
others; when they overlap no threshold separates them and ``low`` is kept, so the task's own
calls still match at the rate the quantile promises (the shadow pairs and the per-request gate
decide whether such matches may be answered locally).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Vectors = np.ndarray | Sequence[Sequence[float]]

# Tokens of a request's content embedded for matching (the encoder's ``max_length`` on both
# sides): the encoder's cost grows with tokens and the head of a message says what it is about.
# A centroid must be computed with the same cap as the requests compared to it.
MATCH_MAX_TOKENS = 32


def _rows(vectors: Vectors) -> np.ndarray:
    rows = np.asarray(vectors, dtype=np.float32)
    if rows.ndim == 1:
        rows = rows[None, :]
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, 1e-12)


def centroid(vectors: Vectors) -> list[float]:
    """The L2-normalised mean of the L2-normalised rows, so a dot product with it is a cosine."""
    rows = _rows(vectors)
    if rows.shape[0] == 0:
        raise ValueError("a centroid needs at least one vector")
    mean = rows.mean(axis=0)
    return [float(x) for x in mean / max(float(np.linalg.norm(mean)), 1e-12)]


def cosines(vectors: Vectors, center: Sequence[float] | np.ndarray) -> np.ndarray:
    """Each row's cosine to ``center``; rows and center need not be normalised."""
    rows = _rows(vectors)
    c = np.asarray(center, dtype=np.float32)
    return rows @ (c / max(float(np.linalg.norm(c)), 1e-12))


def calibrate_threshold(
    member_cosines: Sequence[float] | np.ndarray,
    other_cosines: Sequence[float] | np.ndarray | None = None,
    *,
    quantile: float = 0.02,
    margin: float = 0.05,
) -> float:
    """The cosine a request needs to match the task (the rule is in the module docstring)."""
    members = np.asarray(member_cosines, dtype=np.float64)
    if members.size == 0:
        raise ValueError("calibrating a threshold needs the cosines of at least one member")
    low = float(np.quantile(members, quantile))
    threshold = low - margin
    others = np.asarray(other_cosines if other_cosines is not None else (), dtype=np.float64)
    if others.size:
        high = float(np.quantile(others, 1 - quantile))
        threshold = (high + low) / 2 if high < low else low
    return round(min(max(threshold, -1.0), 1.0), 6)
