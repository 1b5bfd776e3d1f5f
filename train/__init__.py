"""The training box: from collected traces to published task adapters (``slm-agent train …``)."""
