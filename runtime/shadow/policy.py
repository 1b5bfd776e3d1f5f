"""When a task's adapter goes live and when it stops: the promotion rule, a pure function of a
task's settings, its state and its pair tally (``Promoter`` applies it to each scored pair)."""

from __future__ import annotations

from slm_agent.contracts.tasks import Task
from slm_agent.runtime.shadow.gate import Gate
from slm_agent.runtime.shadow.records import PairStats, StateName, TaskState

Decision = tuple[StateName, str]


def next_state(task: Task, state: TaskState, stats: PairStats, gate: Gate | None = None) -> Decision | None:
    """The move ``stats`` call for, or None to stay.

    shadow/demoted -> live once there are ``min_pairs`` pairs and agreement's lower bound reaches
    the target, or a ``gate`` fitted on them covers some requests at that bound. live -> demoted
    when a full recent window is confidently worse than the target (its upper bound below it):
    one unlucky pair must not demote a good adapter.
    """
    rule = task.promotion
    if state.state in ("shadow", "demoted"):
        if stats.n < rule.min_pairs:
            return None
        if stats.lower >= rule.target:
            return (
                "live",
                f"promoted: agreement {stats.rate or 0:.2f} (lower bound {stats.lower:.2f}) over {stats.n} pairs",
            )
        if gate is not None and gate.lower_bound >= rule.target:
            return (
                "live",
                f"promoted with a gate: agreement {gate.covered_agreement:.2f} (lower bound "
                f"{gate.lower_bound:.2f}) on the {gate.coverage:.0%} of {gate.n} pairs it lets through",
            )
        return None
    if state.state == "live" and stats.recent_n >= rule.drift_window and stats.recent_upper < rule.target:
        return (
            "demoted",
            f"demoted: recent agreement {stats.recent_rate or 0:.2f} over {stats.recent_n} pairs",
        )
    return None
