"""The rich console the CLI prints with."""

from __future__ import annotations

import sys

from rich.console import Console


def console(stderr: bool = False) -> Console:
    """Results go to stdout; progress notes to stderr, so `--json` output stays parseable."""
    # Piped output (scripts, tests) gets wide lines instead of tables squeezed to 80 columns.
    stream = sys.stderr if stderr else sys.stdout
    return Console(width=None if stream.isatty() else 200, stderr=stderr, log_path=False)
