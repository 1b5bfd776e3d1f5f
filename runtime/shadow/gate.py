"""The per-request gate: which of a live task's requests the local model may answer.

A small model is rarely right on every input of a task, but it is often right on most of them and
knows a little about which: its token log-probabilities drop on inputs it finds hard. The gate is a
logistic regression over a few features of one local answer, fitted on the task's shadow pairs
(agreed with the remote or not), and a threshold on its predicted agreement chosen to cover as
many requests as possible while the agreement among covered ones keeps its Wilson lower bound at
or above the task's target. The threshold is chosen on out-of-fold predictions: chosen on the
pairs the model was fitted on, it flatters itself (held-out agreement then lands below the
target about one fit in four; bench/bench_shadow.py). Plain numpy: six features and a few hundred
pairs need nothing more.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, Field

from slm_agent.runtime.shadow.stats import Z_ONE_SIDED_95, wilson_bounds

FEATURE_NAMES = (
    "mean_logprob",
    "min_logprob",
    "match_score",
    "log_input_chars",
    "n_tools",
    "log_answer_tokens",
)
# A grammar can force a token the raw distribution finds nearly impossible; past this it says no more.
_LOGPROB_FLOOR = -30.0
_FOLDS = 5


def gate_features(
    token_logprobs: Sequence[float],
    match_score: float | None,
    input_chars: int,
    n_tools: int,
    completion_tokens: int,
) -> list[float]:
    """One local answer's features, in FEATURE_NAMES order. An explicit match (no score) is certain."""
    logprobs = [max(_LOGPROB_FLOOR, lp) for lp in token_logprobs] or [0.0]
    return [
        sum(logprobs) / len(logprobs),
        min(logprobs),
        1.0 if match_score is None else float(match_score),
        math.log1p(max(0, input_chars)),
        float(n_tools),
        math.log1p(max(0, completion_tokens)),
    ]


class Gate(BaseModel):
    """A fitted gate: standardise, score, compare with the threshold."""

    feature_names: list[str] = Field(default_factory=lambda: list(FEATURE_NAMES))
    mean: list[float] = Field(description="Per-feature mean of the training pairs (standardisation).")
    scale: list[float] = Field(description="Per-feature standard deviation of the training pairs.")
    weights: list[float]
    bias: float
    threshold: float = Field(description="Predicted agreement a request needs to be answered locally.")
    target: float = Field(description="The agreement target the threshold was chosen for.")
    coverage: float = Field(description="Share of the pairs the threshold lets through (out of fold).")
    covered_agreement: float = Field(description="Agreement among those pairs.")
    lower_bound: float = Field(description="Its Wilson lower bound (>= target).")
    n: int = Field(description="Pairs the gate was fitted on.")

    def probability(self, features: Sequence[float]) -> float:
        """Predicted probability that this answer agrees with what the remote would say."""
        x = (np.asarray(features, dtype=float) - np.asarray(self.mean)) / np.asarray(self.scale)
        return float(_sigmoid(np.asarray([x @ np.asarray(self.weights) + self.bias]))[0])

    def allows(self, features: Sequence[float]) -> bool:
        return self.probability(features) >= self.threshold


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


def _fit_logistic(
    x: np.ndarray, y: np.ndarray, l2: float, steps: int, rate: float
) -> tuple[np.ndarray, float]:
    """Full-batch gradient descent on the L2-penalised log loss (standardised features converge
    in a few hundred steps). The penalty keeps probabilities moderate where pairs are few."""
    n, d = x.shape
    w, b = np.zeros(d), float(np.log((y.sum() + 1) / (n - y.sum() + 1)))
    for _ in range(steps):
        error = _sigmoid(x @ w + b) - y
        w -= rate * (x.T @ error / n + l2 * w / n)
        b -= rate * float(error.mean())
    return w, b


def _out_of_fold(x: np.ndarray, y: np.ndarray, l2: float, steps: int, rate: float) -> np.ndarray:
    """Each pair's predicted agreement from a model fitted without it (fixed folds: a refit on
    the same pairs gives the same gate)."""
    order = np.random.default_rng(0).permutation(len(y))
    probabilities = np.empty(len(y))
    for held in np.array_split(order, _FOLDS):
        fitted = np.setdiff1d(order, held)
        w, b = _fit_logistic(x[fitted], y[fitted], l2, steps, rate)
        probabilities[held] = _sigmoid(x[held] @ w + b)
    return probabilities


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-9] = 1.0  # a constant feature carries nothing; keep it at zero
    return (x - mean) / scale, mean, scale


def _ranked(probabilities: np.ndarray, agreed: np.ndarray) -> list[tuple[int, int, float]]:
    """(covered, agreed among covered, threshold) for every cut between distinct probabilities,
    highest probability first: covering k requests means covering every one scored as high."""
    order = np.argsort(-probabilities, kind="stable")
    p, cumulative = probabilities[order], np.cumsum(agreed[order])
    return [
        (k, int(cumulative[k - 1]), float(p[k - 1]))
        for k in range(1, len(p) + 1)
        if k == len(p) or p[k] < p[k - 1]
    ]


def fit_gate(
    features: Sequence[Sequence[float]],
    agreed: Sequence[bool],
    target: float,
    *,
    z: float = Z_ONE_SIDED_95,
    l2: float = 1.0,
    steps: int = 400,
    rate: float = 0.5,
) -> Gate | None:
    """The gate covering the most pairs whose covered agreement has a lower bound >= ``target``;
    None when no threshold gets there (the task keeps asking the remote)."""
    x_raw = np.asarray(features, dtype=float)
    y = np.asarray(agreed, dtype=float)
    if x_raw.ndim != 2 or len(x_raw) == 0 or len(x_raw) != len(y):
        return None
    x, mean, scale = _standardise(x_raw)
    w, b = _fit_logistic(x, y, l2, steps, rate)
    # Under 25 pairs no threshold reaches a useful lower bound anyway: nothing worth holding out.
    enough = len(y) >= 5 * _FOLDS
    probabilities = _out_of_fold(x, y, l2, steps, rate) if enough else _sigmoid(x @ w + b)
    best: tuple[int, int, float, float] | None = None
    for covered, good, threshold in _ranked(probabilities, y):
        lower = wilson_bounds(good, covered, z)[0]
        if lower >= target:
            best = (covered, good, threshold, lower)
    if best is None:
        return None
    covered, good, threshold, lower = best
    return Gate(
        feature_names=list(FEATURE_NAMES)[: x.shape[1]],
        mean=mean.tolist(),
        scale=scale.tolist(),
        weights=w.tolist(),
        bias=b,
        threshold=threshold,
        target=target,
        coverage=covered / len(y),
        covered_agreement=good / covered,
        lower_bound=lower,
        n=len(y),
    )


def risk_coverage(
    features: Sequence[Sequence[float]], agreed: Sequence[bool], gate: Gate | None = None
) -> list[tuple[float, float]]:
    """(coverage, agreement among covered) at every threshold, requests ranked by ``gate``'s
    predicted agreement (held-out pairs) or, without one, by a model fitted on these pairs."""
    x = np.asarray(features, dtype=float)
    y = np.asarray(agreed, dtype=float)
    if len(y) == 0:
        return []
    if gate is None:
        xs = _standardise(x)[0]
        w, b = _fit_logistic(xs, y, 1.0, 400, 0.5)
        probabilities = _sigmoid(xs @ w + b)
    else:
        probabilities = np.asarray([gate.probability(row) for row in x])
    return [(covered / len(y), good / covered) for covered, good, _ in _ranked(probabilities, y)]
