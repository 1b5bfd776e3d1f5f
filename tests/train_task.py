"""A generated task with known ground truth, for the training-box tests and benchmark.

Shipment sentences from a few templates; the answer is a JSON object whose fields the base model
can't reliably fill without training (origin vs destination swap places across templates).
"""

from __future__ import annotations

import json
import random
import tomllib
from typing import Any

from slm_agent.contracts.tasks import Task, parse_task

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "order": {"type": "integer"},
        "item": {"type": "string"},
        "quantity": {"type": "integer"},
        "origin": {"type": "string"},
        "destination": {"type": "string"},
    },
    "required": ["order", "item", "quantity", "origin", "destination"],
}

TASK_TOML = f"""name = "shipment"
description = "Extract a shipment's order number, item, quantity, origin and destination."
kind = "json"
routing = "local"
instructions = "Extract the shipment as JSON."
output_schema = {json.dumps(SCHEMA).replace('": ', '" = ').replace('{"', '{ "').replace(', "', ', "')}

[sampling]
temperature = 0.0
max_tokens = 48
"""

_ITEMS = [
    "apples",
    "bolts",
    "cables",
    "drills",
    "engines",
    "fabric",
    "gloves",
    "helmets",
    "ink",
    "jars",
    "kettles",
    "lamps",
    "magnets",
    "nails",
    "oil",
    "paper",
    "quartz",
    "rope",
    "salt",
    "tiles",
]
_CITIES = [
    "Lyon",
    "Oslo",
    "Porto",
    "Riga",
    "Turin",
    "Bergen",
    "Malmo",
    "Ghent",
    "Cork",
    "Split",
    "Bern",
    "Graz",
    "Brno",
    "Pisa",
    "Nice",
    "Kiel",
    "Lund",
    "Delft",
    "Aarhus",
    "Tartu",
]
_TEMPLATES = [
    "Order {order}: {quantity} crates of {item} from {origin} to {destination}.",
    "Deliver to {destination} from {origin}: {quantity} boxes of {item} (order {order}).",
    "{destination} is waiting for {quantity} pallets of {item}; they leave {origin} under order {order}.",
    "Ref {order} - ship {item} x{quantity}, origin {origin}, destination {destination}.",
]


def shipment_task() -> Task:
    return parse_task(tomllib.loads(TASK_TOML), "generated")


def shipments(n: int, seed: int = 0) -> list[tuple[str, dict[str, Any]]]:
    """``n`` distinct (sentence, answer) pairs."""
    rng = random.Random(seed)
    out: list[tuple[str, dict[str, Any]]] = []
    seen: set[int] = set()
    while len(out) < n:
        order = rng.randint(1000, 9999)
        if order in seen:
            continue
        seen.add(order)
        origin, destination = rng.sample(_CITIES, 2)
        answer = {
            "order": order,
            "item": rng.choice(_ITEMS),
            "quantity": rng.randint(2, 90),
            "origin": origin,
            "destination": destination,
        }
        out.append((rng.choice(_TEMPLATES).format(**answer), answer))
    return out
