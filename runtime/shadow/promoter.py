"""Applies the promotion rule to every scored pair: store it, decide, fit the per-request gate on
promotion (and refit it as a live task's pairs grow), record the transition. The shadow worker and the live path call it after each pair,
the admin routes for a manual override.
"""

from __future__ import annotations

import logging
import threading

from slm_agent.contracts.tasks import Task
from slm_agent.errors import ConflictError
from slm_agent.runtime.shadow.gate import Gate, fit_gate
from slm_agent.runtime.shadow.policy import next_state
from slm_agent.runtime.shadow.records import PairRecord, PairStats, TaskState
from slm_agent.runtime.shadow.states import TaskStates

log = logging.getLogger(__name__)


class Promoter:
    """Applies the policy to every pair; one decision at a time."""

    def __init__(self, states: TaskStates) -> None:
        self.states = states
        self._lock = threading.Lock()

    def state(self, task: str) -> TaskState:
        return self.states.state(task)

    def ensure_adapter(self, task: str, adapter: str | None) -> TaskState:
        """A task got (or lost) an adapter: a new one starts in shadow, none means proxied.
        The same adapter again (a daemon restart, a re-pull) keeps the state it earned.
        Called on every matched request: the usual no-change answer takes no lock."""
        current = self.states.state(task)
        if not _changes(current, adapter):
            return current
        with self._lock:
            current = self.states.state(task)
            if not _changes(current, adapter):
                return current
            if adapter is None:
                return self.states.set_state(task, None, "proxied", "adapter removed")
            return self.states.set_state(
                task, adapter, "shadow", f"adapter {adapter} published: comparing it with the remote"
            )

    def record_pair(self, task: Task, pair: PairRecord) -> TaskState:
        """Store ``pair``; promote or demote ``task`` when its pairs now call for it."""
        adapter = pair.adapter
        with self._lock:
            state = self.states.state(task.name)
            stats = self.states.add_pair(pair, task.promotion.drift_window)
            if state.adapter != adapter or state.state == "proxied":
                return state  # a pair of another adapter: kept, decides nothing
            gate = None
            if state.state in ("shadow", "demoted") and stats.n >= task.promotion.min_pairs:
                if stats.lower >= task.promotion.target or _refit_due(stats.n, task.promotion.min_pairs):
                    gate = self.fit_gate(task, adapter)
            elif state.state == "live" and state.gate is not None:
                # Sampled and gated-out live requests keep adding pairs: the gate learns from them
                # (and from the shadow pairs before) at the same pace as in shadow. A refit that
                # finds no safe threshold keeps the old gate; drift decides whether it stays live.
                due = stats.n >= task.promotion.min_pairs and _refit_due(stats.n, task.promotion.min_pairs)
                if due and (refit := self.fit_gate(task, adapter, current=False)):
                    state = self.states.set_gate(task.name, refit)
                    log.info(
                        "task %s: gate refitted on %d pairs, coverage %.2f",
                        task.name,
                        refit.n,
                        refit.coverage,
                    )
                assert state.gate is not None
                stats = self._gated_stats(task, adapter, state.gate)
            decision = next_state(task, state, stats, gate)
            if decision is None:
                return state
            new_state, reason = decision
            return self.states.set_state(
                task.name, adapter, new_state, reason, gate if new_state == "live" else None
            )

    def fit_gate(self, task: Task, adapter: str | None, current: bool = True) -> Gate | None:
        """A gate fitted on the adapter's pairs since its task's state began (``current``: a
        demoted adapter earns its way back on new pairs), or on all of them (a live refit: the
        shadow pairs that promoted it and the live ones since)."""
        pairs = self.states.pairs(task.name, adapter, current=current)
        pairs = [p for p in pairs if p.features and p.agreed is not None]
        if not pairs:
            return None
        return fit_gate([p.features for p in pairs], [bool(p.agreed) for p in pairs], task.promotion.target)

    def _gated_stats(self, task: Task, adapter: str | None, gate: Gate) -> PairStats:
        """A gated live task answers only what its gate allows: drift is measured on those pairs."""
        verdicts = [
            bool(p.agreed)
            for p in self.states.pairs(task.name, adapter)
            if p.agreed is not None and (not p.features or gate.allows(p.features))
        ]
        return PairStats.of(task.name, adapter, verdicts, task.promotion.drift_window)

    # -- manual overrides ------------------------------------------------------------------------
    def promote(self, task: Task, reason: str = "manual") -> TaskState:
        """Send the task live by hand: its adapter answers every matched request (no gate)."""
        with self._lock:
            adapter = self.states.state(task.name).adapter or task.adapter
            if adapter is None:
                raise ConflictError(
                    f"task {task.name!r} has no adapter to promote; train and publish one first "
                    "(slm-agent sync pull installs published adapters)"
                )
            return self.states.set_state(task.name, adapter, "live", reason)

    def demote(self, task: Task, reason: str = "manual") -> TaskState:
        """Take the task off live by hand: the remote answers; shadow pairs can promote it again."""
        with self._lock:
            current = self.states.state(task.name)
            adapter = current.adapter or task.adapter
            if adapter is None:
                raise ConflictError(f"task {task.name!r} has no adapter: the remote already answers it")
            return self.states.set_state(task.name, adapter, "demoted", reason)


def _changes(current: TaskState, adapter: str | None) -> bool:
    if adapter is None:
        return current.state != "proxied"
    return current.adapter != adapter or current.state == "proxied"


def _refit_due(n: int, min_pairs: int) -> bool:
    """Fit a gate on a task still in shadow each time its pairs grow by another 5 % (a fit over
    thousands of pairs takes a good fraction of a second; one per pair would be waste)."""
    return (n - min_pairs) % max(1, n // 20) == 0
