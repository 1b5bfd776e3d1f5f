"""Shadow mode: compare a task's adapter with the remote on live traffic, promote it when it
agrees, gate which requests it answers, demote it when it drifts."""

from slm_agent.runtime.shadow.agreement import agreement
from slm_agent.runtime.shadow.gate import Gate, fit_gate, gate_features
from slm_agent.runtime.shadow.policy import next_state
from slm_agent.runtime.shadow.promoter import Promoter
from slm_agent.runtime.shadow.records import PairRecord, PairStats, TaskState
from slm_agent.runtime.shadow.states import TaskStates
from slm_agent.runtime.shadow.worker import ShadowJob, ShadowWorker

__all__ = [
    "Gate",
    "PairRecord",
    "PairStats",
    "Promoter",
    "ShadowJob",
    "ShadowWorker",
    "TaskState",
    "TaskStates",
    "agreement",
    "fit_gate",
    "gate_features",
    "next_state",
]
