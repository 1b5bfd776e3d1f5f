"""``slm-agent`` command groups of the device: config, tasks, traces, models, sync."""
