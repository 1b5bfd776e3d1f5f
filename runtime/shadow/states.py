"""The one writer of ``task_states``, ``task_transitions`` and ``shadow_pairs`` (migration m003).

Its own connection to the trace store's WAL database (like the span store), so shadow bookkeeping
never waits on trace writes. The current states are also kept in memory: routing reads a task's
state on every request.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slm_agent.contracts.clock import utcnow
from slm_agent.runtime.shadow.gate import Gate
from slm_agent.runtime.shadow.records import PairRecord, PairStats, StateName, TaskState, Transition
from slm_agent.runtime.store.connection import LockedConnection

log = logging.getLogger(__name__)

EventFn = Callable[[str, dict[str, Any]], object]
_PAIR_JSON = ("local_output", "remote_output", "features")
_PAIR_COLUMNS = [n for n in PairRecord.model_fields if n != "seq"]


def _no_event(kind: str, data: dict[str, Any]) -> None:
    return None


class TaskStates(LockedConnection):
    def __init__(self, db_path: Path, on_event: EventFn = _no_event, *, store_redacted: bool = False) -> None:
        super().__init__(db_path, store_redacted=store_redacted)
        self._on_event = on_event
        with self._lock:
            rows = self._conn.execute("SELECT * FROM task_states").fetchall()
        self._states = {row["task"]: _state_from_row(row) for row in rows}

    # -- states ----------------------------------------------------------------------------------
    def state(self, task: str) -> TaskState:
        """The task's state; a task never seen is ``proxied``."""
        with self._lock:
            return self._states.get(task) or TaskState(task=task)

    def all_states(self) -> list[TaskState]:
        with self._lock:
            return sorted(self._states.values(), key=lambda s: s.task)

    def set_state(
        self, task: str, adapter: str | None, state: StateName, reason: str, gate: Gate | None = None
    ) -> TaskState:
        """Move ``task`` to ``state``: one transition row, the new current row, a ``task_state`` event."""
        new = TaskState(
            task=task, adapter=adapter, state=state, reason=reason, changed_at=utcnow(), gate=gate
        )
        with self._lock:
            old = self._states.get(task)
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._write_state(new)
                self._conn.execute(
                    "INSERT INTO task_transitions (task, adapter, from_state, to_state, reason, at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [task, adapter, old.state if old else None, state, reason, new.changed_at],
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._states[task] = new
        log.info("task %s: %s -> %s (%s)", task, old.state if old else None, state, reason)
        self._emit(
            "task_state",
            {
                "task": task,
                "adapter": adapter,
                "from_state": old.state if old else None,
                "state": state,
                "reason": reason,
                "at": new.changed_at,
                "gate_coverage": gate.coverage if gate else None,
            },
        )
        return new

    def set_gate(self, task: str, gate: Gate | None) -> TaskState:
        """Replace a task's gate (a refit) without changing its state."""
        with self._lock:
            current = self._states.get(task) or TaskState(task=task)
            updated = current.model_copy(update={"gate": gate, "changed_at": current.changed_at or utcnow()})
            self._write_state(updated)
            self._states[task] = updated
        return updated

    def _write_state(self, state: TaskState) -> None:
        self._conn.execute(
            "INSERT INTO task_states (task, adapter, state, reason, changed_at, gate) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(task) DO UPDATE SET adapter = excluded.adapter, state = excluded.state, "
            "reason = excluded.reason, changed_at = excluded.changed_at, gate = excluded.gate",
            [
                state.task,
                state.adapter,
                state.state,
                state.reason,
                state.changed_at,
                state.gate.model_dump_json() if state.gate else None,
            ],
        )

    def transitions(self, task: str | None = None, limit: int = 100) -> list[Transition]:
        """The newest transitions first, of one task or all."""
        where, args = ("WHERE task = ?", [task]) if task else ("", [])
        with self._lock:
            rows = self._conn.execute(
                f"SELECT * FROM task_transitions {where} ORDER BY seq DESC LIMIT ?", [*args, limit]
            ).fetchall()
        return [Transition.model_validate(dict(r)) for r in rows]

    # -- pairs -----------------------------------------------------------------------------------
    def add_pair(self, pair: PairRecord, window: int = 20) -> PairStats:
        """Store a scored pair; the tally of its task and adapter afterwards."""
        row = {name: getattr(pair, name) for name in _PAIR_COLUMNS}
        row |= self.at_rest({k: row[k] for k in ("local_output", "remote_output", "error")})
        values = [_encode(name, row[name]) for name in _PAIR_COLUMNS]
        with self._lock:
            cursor = self._conn.execute(
                f"INSERT INTO shadow_pairs ({', '.join(_PAIR_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(_PAIR_COLUMNS))})",
                values,
            )
        pair.seq = cursor.lastrowid
        self._emit(
            "shadow_pair",
            {
                "task": pair.task,
                "adapter": pair.adapter,
                "trace_id": pair.trace_id,
                "agreed": pair.agreed,
                "score": pair.score,
                "error": pair.error,
            },
        )
        return self.stats(pair.task, pair.adapter, window)

    def _epoch(self, task: str, adapter: str | None) -> str:
        """Pairs from this time on count: a demoted adapter earns promotion on new pairs only."""
        with self._lock:
            current = self._states.get(task)
        if current is None or current.adapter != adapter:
            return ""
        return current.changed_at or ""

    def _judged(self, columns: str, task: str, adapter: str | None, since: str) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(
                f"SELECT {columns} FROM shadow_pairs WHERE task = ? AND adapter IS ? AND created_at >= ? "
                "AND agreed IS NOT NULL ORDER BY seq",
                [task, adapter, since],
            ).fetchall()

    def stats(self, task: str, adapter: str | None, window: int = 20) -> PairStats:
        """Agreement of ``adapter`` on ``task`` since the task entered its state, and over the
        newest ``window`` of those pairs (what a demotion looks at)."""
        rows = self._judged("agreed", task, adapter, self._epoch(task, adapter))
        return PairStats.of(task, adapter, [bool(r[0]) for r in rows], window)

    def pairs(self, task: str, adapter: str | None, *, current: bool = True) -> list[PairRecord]:
        """The judged pairs of ``adapter`` on ``task`` in order (since the task's state began when
        ``current``): what the gate is fitted on."""
        since = self._epoch(task, adapter) if current else ""
        return [_pair_from_row(r) for r in self._judged("*", task, adapter, since)]

    def pair_totals(self) -> dict[str, tuple[int, int]]:
        """Per task: (judged pairs, agreeing pairs), over all time (the /metrics counters)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT task, count(agreed), coalesce(sum(agreed), 0) FROM shadow_pairs GROUP BY task"
            ).fetchall()
        return {r[0]: (int(r[1]), int(r[2])) for r in rows}

    def _emit(self, kind: str, data: dict[str, Any]) -> None:
        try:
            self._on_event(kind, data)
        except Exception:  # a monitoring failure must not undo a decision already stored
            log.exception("publishing %s event failed", kind)


def _encode(name: str, value: Any) -> Any:
    if name in _PAIR_JSON:
        return None if value is None else json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return int(value)
    return value


def _state_from_row(row: sqlite3.Row) -> TaskState:
    data = dict(row)
    data["gate"] = Gate.model_validate_json(data["gate"]) if data.get("gate") else None
    return TaskState.model_validate(data)


def _pair_from_row(row: sqlite3.Row) -> PairRecord:
    data = dict(row)
    for name in _PAIR_JSON:
        data[name] = json.loads(data[name]) if data.get(name) else None
    data["features"] = data["features"] or []
    data["agreed"] = None if data["agreed"] is None else bool(data["agreed"])
    return PairRecord.model_validate(data)
