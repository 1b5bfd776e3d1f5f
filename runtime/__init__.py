"""The daemon: settings, tasks, engine, routing, remote LLMs, HTTP API, traces and sync."""
