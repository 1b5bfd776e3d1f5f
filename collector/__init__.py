"""Training-box side: collects device traces."""
