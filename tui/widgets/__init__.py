"""Widgets of the monitor, grouped by the screen area they draw."""
