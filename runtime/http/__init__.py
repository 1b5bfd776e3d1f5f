"""The HTTP layer: app factory, dependencies, routes, errors, guard, metrics."""
