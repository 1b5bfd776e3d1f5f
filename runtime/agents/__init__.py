"""Agent runs: the remote plans, steps run where they fit."""
