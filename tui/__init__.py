"""`slm-agent tui`: the Textual monitor of a running daemon or a trace database."""
