"""Task matching on every chat request: explicit name, template signature, nearest centroid."""

from slm_agent.runtime.matching.loader import load_encoder
from slm_agent.runtime.matching.matcher import ContentQuery, Match, MatchMethod, TaskMatcher

__all__ = ["ContentQuery", "Match", "MatchMethod", "TaskMatcher", "load_encoder"]
