"""``/v1/embeddings``: the device's int8 encoder for its own model id, a remote for the others."""
