"""Device side of sync: cursors (``state``), targets, push, the background worker, pull of adapters."""
