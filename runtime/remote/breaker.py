"""Guards on remote calls: a circuit breaker per provider and the daily token/cost budget."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Literal

from slm_agent.errors import BudgetExceededError

logger = logging.getLogger(__name__)


class CircuitBreaker:
    """Stops calling a provider that keeps failing, and lets one probe through after a cooldown.

    closed --N consecutive failures--> open --cooldown--> half-open --success--> closed
                                        ^--------------------failure----------------'
    In half-open only one call (the probe) is let through; a probe nobody reports on for another
    cooldown is presumed lost, so a caller that dropped a stream cannot wedge the breaker.
    """

    def __init__(
        self, failures: int, cooldown_s: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.failures_to_open = failures
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self.consecutive_failures = 0
        self._opened_at: float | None = None
        self._probe_since: float | None = None

    @property
    def state(self) -> Literal["closed", "open", "half_open"]:
        with self._lock:
            return self._state()

    def _state(self) -> Literal["closed", "open", "half_open"]:
        if self._opened_at is None:
            return "closed"
        return "half_open" if self._clock() - self._opened_at >= self.cooldown_s else "open"

    def would_allow(self) -> bool:
        """``allow`` without taking the probe slot: for routing decisions."""
        with self._lock:
            state = self._state()
            return state == "closed" or (state == "half_open" and not self._probe_busy())

    def allow(self) -> bool:
        with self._lock:
            state = self._state()
            if state == "closed":
                return True
            if state == "open" or self._probe_busy():
                return False
            self._probe_since = self._clock()
            return True

    def _probe_busy(self) -> bool:
        return self._probe_since is not None and self._clock() - self._probe_since < max(self.cooldown_s, 1.0)

    def retry_after_s(self) -> float:
        with self._lock:
            if self._opened_at is None:
                return 0.0
            return max(0.0, self.cooldown_s - (self._clock() - self._opened_at))

    def record_success(self) -> None:
        with self._lock:
            if self._opened_at is not None:
                logger.info("circuit breaker closed again after a successful probe")
            self.consecutive_failures = 0
            self._opened_at = self._probe_since = None

    def record_failure(self) -> None:
        with self._lock:
            self.consecutive_failures += 1
            probing = self._probe_since is not None
            self._probe_since = None
            if probing or self.consecutive_failures >= self.failures_to_open:
                if self._opened_at is None or probing:
                    logger.warning(
                        "circuit breaker opened after %d consecutive failure(s)", self.consecutive_failures
                    )
                self._opened_at = self._clock()

    def record_neutral(self) -> None:
        """A call that says nothing about the provider's health (429, 4xx): free the probe slot."""
        self.release()

    def release(self) -> None:
        with self._lock:
            self._probe_since = None


class DailyBudget:
    """Tokens and USD spent on remote calls today (UTC), in memory: a restart forgets them."""

    def __init__(
        self,
        max_tokens: int | None,
        max_cost_usd: float | None,
        *,
        today: Callable[[], date] = lambda: datetime.now(UTC).date(),
    ) -> None:
        self.max_tokens = max_tokens
        self.max_cost_usd = max_cost_usd
        self._today = today
        self._lock = threading.Lock()
        self._day = today()
        self.tokens = 0
        self.cost_usd = 0.0

    def _roll(self) -> None:
        day = self._today()
        if day != self._day:
            self._day, self.tokens, self.cost_usd = day, 0, 0.0

    def exhausted(self) -> bool:
        with self._lock:
            self._roll()
            return (self.max_tokens is not None and self.tokens >= self.max_tokens) or (
                self.max_cost_usd is not None and self.cost_usd >= self.max_cost_usd
            )

    def check(self) -> None:
        if self.exhausted():
            raise BudgetExceededError(
                f"today's remote budget is spent ({self.tokens} tokens, ${self.cost_usd:.4f}; limits "
                f"{self.max_tokens} tokens, ${self.max_cost_usd}); it resets at midnight UTC, "
                "or raise remote.daily_token_budget / remote.daily_cost_budget_usd"
            )

    def record(self, tokens: int, cost_usd: float) -> None:
        with self._lock:
            self._roll()
            self.tokens += tokens
            self.cost_usd += cost_usd
