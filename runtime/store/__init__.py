"""The device's SQLite: trace store, migrations, agent-run spans, the event bus, monitor queries."""
