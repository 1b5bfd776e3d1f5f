"""What the device, the collector and the training box share: task definitions, prompts, trace records, wire and API types, schema checks, time helpers."""
