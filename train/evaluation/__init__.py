"""Evaluation: every candidate on the held-out set, run as the daemon runs it, and its metrics."""
