"""slm-agent: serve agent subtasks on a small local model, escalate the rest."""

__version__ = "0.1.0"
