"""The daemon's routes, one module per API surface; each holds a FastAPI ``router`` kept thin over
routing, serving and the stores."""
