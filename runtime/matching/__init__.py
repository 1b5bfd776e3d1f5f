"""Task matching on every chat request: explicit name, template signature, nearest centroid."""

from slm_agent.runtime.matching.loader import load_encoder
from slm_agent.runtime.matching.matcher import Match, MatchMethod, TaskMatcher

__all__ = ["Match", "MatchMethod", "TaskMatcher", "load_encoder"]
