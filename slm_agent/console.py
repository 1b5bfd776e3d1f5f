"""The rich console the CLI prints with."""

from __future__ import annotations

import sys

from rich.console import Console


def console() -> Console:
    # Piped output (scripts, tests) gets wide lines instead of tables squeezed to 80 columns.
    return Console(width=None if sys.stdout.isatty() else 200)
