"""One module per screen of the monitor."""
