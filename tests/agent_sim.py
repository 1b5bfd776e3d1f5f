"""A generated agent of our own: what an unmodified OpenAI-SDK agent sends to the daemon.

It always asks for ``model="gpt-4o"`` and never names a task. Three recurring steps, each with its
own fixed system prompt (and tools or response format) and inputs drawn from templates and small
vocabularies, plus free-form planning requests that must stay remote:

- ``pick_tool``: one tool call, its arguments copied verbatim from the request;
- ``extract_contact``: a JSON object (json_schema response format) copied from a sentence;
- ``classify_ticket``: one label out of three, decided by keywords the generator planted.

The steps are kept easy on purpose (short inputs, copied values, keyword labels): the loop's test
asks a 270M model with a LoRA of a few dozen CPU steps to match the remote on them. Each generated
call carries its ground truth, and ``ground_truth(body)`` recomputes it from a request alone, so a
scripted remote (``teacher.py``) can answer correctly without shared state.
"""

from __future__ import annotations

import json
import random
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from slm_agent.contracts.signature import message_text, request_content
from slm_agent.runtime.remote.assembled import AssembledMessage

if TYPE_CHECKING:
    import openai

MODEL = "gpt-4o"
SUBTASKS = ("pick_tool", "extract_contact", "classify_ticket")
PLANNING = "planning"

SYSTEM_PROMPTS = {
    "pick_tool": "You are a home assistant. Call exactly one tool.",
    "extract_contact": "You extract contact details from text. Answer with the JSON object only.",
    "classify_ticket": "You triage support tickets. Answer with one label: billing, bug or account.",
    PLANNING: "You are a planner. Make a step-by-step plan for the user's goal.",
}
EXTRACT_LEAD = "Extract the contact: "
TICKET_LEAD = "Ticket: "

# -- vocabularies (drift in teacher.py shifts a value to its neighbour in its list) ---------------
CITIES = (
    "Paris", "Berlin", "Lima", "Oslo", "Madrid", "Tokyo", "Cairo", "Dublin", "Vienna", "Toronto",
    "Nairobi", "Lisbon", "Prague", "Seoul", "Denver", "Boston", "Milan", "Quito", "Perth", "Zurich",
)  # fmt: skip
ARTISTS = (
    "Adele", "Miles Davis", "Taylor Swift", "Bob Marley", "Nina Simone", "Daft Punk", "Coldplay",
    "Bach", "Beyonce", "Radiohead", "Fela Kuti", "Norah Jones", "Queen", "Shakira", "Eminem",
)  # fmt: skip
ROOMS = (
    "kitchen", "bedroom", "living room", "office", "garage", "bathroom", "hallway", "attic", "basement",
    "dining room", "nursery", "porch",
)  # fmt: skip
FIRST = ("Alice", "Bruno", "Chen", "Dana", "Elif", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kemi", "Luis")
LAST = ("Martin", "Okafor", "Ruiz", "Novak", "Tanaka", "Berg", "Silva", "Khan", "Moreau", "Weber")
DOMAINS = ("acme.example", "globex.example", "initech.example", "umbrella.example")
PRODUCTS = ("Photon", "Ledger", "Notebook", "Atlas", "Beacon", "Orbit")
MONTHS = ("January", "March", "May", "July", "September", "November")
ACTIONS = ("open a file", "save a draft", "upload a photo", "export a report", "share a link")
LABELS = ("billing", "bug", "account")
# Every ticket plants keywords of exactly one label; the label is whichever label's keywords occur.
KEYWORDS = {
    "billing": ("charged", "refund", "invoice", "payment"),
    "bug": ("crashes", "error", "freezes"),
    "account": ("password", "log in", "username"),
}


@dataclass(frozen=True)
class Template:
    """A sentence with ``{slot}`` holes: filled by the generator, parsed back by ``ground_truth``."""

    text: str

    def fill(self, values: dict[str, Any]) -> str:
        return self.text.format(**values)

    def parse(self, text: str) -> dict[str, Any] | None:
        match = _compiled(self.text).fullmatch(text.strip())
        if match is None:
            return None
        return {k: int(v) if k in _INT_SLOTS else v for k, v in match.groupdict().items()}


_INT_SLOTS = frozenset({"minutes", "n"})
_SLOT = re.compile(r"\{(\w+)\}")
_PATTERNS: dict[str, re.Pattern[str]] = {}


def _compiled(text: str) -> re.Pattern[str]:
    if text not in _PATTERNS:
        parts = _SLOT.split(text)  # literal, slot, literal, slot, ...
        regex = "".join(
            re.escape(p) if i % 2 == 0 else (rf"(?P<{p}>\d+)" if p in _INT_SLOTS else rf"(?P<{p}>.+?)")
            for i, p in enumerate(parts)
        )
        _PATTERNS[text] = re.compile(regex, re.DOTALL)
    return _PATTERNS[text]


def _tool(name: str, description: str, slot: str, kind: str) -> dict[str, Any]:
    params = {"type": "object", "properties": {slot: {"type": kind}}, "required": [slot]}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": params}}


TOOLS = [
    _tool("get_weather", "Current weather for a city.", "city", "string"),
    _tool("set_timer", "Start a countdown timer.", "minutes", "integer"),
    _tool("play_music", "Play music by an artist.", "artist", "string"),
    _tool("turn_on_lights", "Turn on the lights in a room.", "room", "string"),
]
# tool -> (its one argument, the vocabulary its value comes from, phrasings)
TOOL_TEMPLATES: dict[str, tuple[str, Callable[[random.Random], Any], tuple[Template, ...]]] = {
    "get_weather": ("city", lambda r: r.choice(CITIES), (
        Template("What's the weather in {city}?"), Template("Will it rain in {city} today?"),
        Template("Weather forecast for {city} please"), Template("Is it cold in {city} right now?"),
    )),
    "set_timer": ("minutes", lambda r: r.randint(1, 90), (
        Template("Set a timer for {minutes} minutes"), Template("Start a {minutes} minute timer"),
        Template("Remind me in {minutes} minutes"), Template("Count down {minutes} minutes please"),
    )),
    "play_music": ("artist", lambda r: r.choice(ARTISTS), (
        Template("Play some {artist}"), Template("Put on music by {artist}"),
        Template("I want to hear {artist}"), Template("Play songs by {artist} please"),
    )),
    "turn_on_lights": ("room", lambda r: r.choice(ROOMS), (
        Template("Turn on the lights in the {room}"), Template("Lights on in the {room} please"),
        Template("It's dark in the {room}, switch the lights on"), Template("Please light up the {room}"),
    )),
}  # fmt: skip

CONTACT_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "email": {"type": "string"}, "phone": {"type": ["string", "null"]}},
    "required": ["name", "email", "phone"],
    "additionalProperties": False,
}  # fmt: skip
RESPONSE_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "contact", "strict": True, "schema": CONTACT_SCHEMA},
}
CONTACT_TEMPLATES = (
    Template("{name} can be reached at {email}."),
    Template("New lead {name}, email {email}."),
    Template("Please send the brochure to {name} at {email}."),
    Template("Please email {name} at {email} or call {phone}."),
    Template("{name} ({email}, {phone}) asked for a quote."),
    Template("Reach {name} on {phone} or at {email}."),
)
TICKET_TEMPLATES = {
    "billing": (
        Template("I was charged twice for {product} in {month}."), Template("Please refund my {product} order."),
        Template("My invoice for {month} shows the wrong amount."),
        Template("The payment for {product} went through two times."),
    ),
    "bug": (
        Template("The {product} app crashes when I {action}."), Template("I get an error message when I {action}."),
        Template("{product} freezes every time I {action}."),
    ),
    "account": (
        Template("I forgot my password for {product}."), Template("I cannot log in to {product} since {month}."),
        Template("Please change the username on my {product} profile."),
    ),
}  # fmt: skip
TICKET_OPENERS = ("", "Hi team, ", "Hello, ", "Urgent! ", "Good morning. ")
TICKET_CLOSERS = ("", " Thanks.", " Please help.", " Any update?", " Regards, a customer")
PLAN_TEMPLATES = (
    Template("Plan a {n}-day trip to {city} on a small budget."),
    Template("Make a plan to learn {skill} in {n} weeks."),
    Template("Help me organise a birthday party for {n} guests at home."),
    Template("Outline how our team of {n} people can move to {tool} without downtime."),
)
SKILLS = ("Spanish", "the piano", "Python", "watercolour painting", "chess", "public speaking")
PLAN_TOOLS = ("a new CRM", "a shared calendar", "Linux laptops", "a monorepo", "a new payroll system")


@dataclass(frozen=True)
class AgentCall:
    subtask: str  # one of SUBTASKS or PLANNING
    body: dict[str, Any]  # the chat.completions request body, as the SDK sends it
    # {"tool_calls": [{"name", "arguments"}]} or {"content": str}; {"content": None} for planning
    expected: dict[str, Any]


@dataclass(frozen=True)
class AgentResult:
    call: AgentCall
    message: dict[str, Any]  # choices[0].message as a dict
    route: str  # X-SLM-Route ("" when the server sends none)
    latency_ms: float
    trace_id: str
    route_reason: str = ""

    @property
    def correct(self) -> bool:
        return is_correct(self.call, self.message)


def _body(subtask: str, user: str, **params: Any) -> dict[str, Any]:
    """The request as the SDK sends it: the step's fixed system prompt, then this call's input."""
    messages = [{"role": "system", "content": SYSTEM_PROMPTS[subtask]}, {"role": "user", "content": user}]
    return {"model": MODEL, "messages": messages, **params}


def _pick_tool(rng: random.Random, i: int) -> AgentCall:
    tool = list(TOOL_TEMPLATES)[i % len(TOOL_TEMPLATES)]  # balanced over tools
    slot, draw, templates = TOOL_TEMPLATES[tool]
    value = draw(rng)
    body = _body("pick_tool", rng.choice(templates).fill({slot: value}), tools=TOOLS, temperature=0)
    return AgentCall("pick_tool", body, {"tool_calls": [{"name": tool, "arguments": {slot: value}}]})


def _extract_contact(rng: random.Random, i: int) -> AgentCall:
    first, last, domain = rng.choice(FIRST), rng.choice(LAST), rng.choice(DOMAINS)
    email = rng.choice((f"{first}.{last}", f"{first[0]}{last}", first)).lower() + "@" + domain
    phone = f"555-{rng.randint(0, 9999):04d}"
    template = CONTACT_TEMPLATES[i % len(CONTACT_TEMPLATES)]  # half with a phone, half without
    contact = {
        "name": f"{first} {last}",
        "email": email,
        "phone": phone if "{phone}" in template.text else None,
    }
    user = EXTRACT_LEAD + template.fill(contact)
    body = _body("extract_contact", user, response_format=RESPONSE_FORMAT, temperature=0)
    return AgentCall("extract_contact", body, {"content": json.dumps(contact)})


def _classify_ticket(rng: random.Random, i: int) -> AgentCall:
    label = LABELS[i % len(LABELS)]
    slots = {"product": rng.choice(PRODUCTS), "month": rng.choice(MONTHS), "action": rng.choice(ACTIONS)}
    text = (
        rng.choice(TICKET_OPENERS)
        + rng.choice(TICKET_TEMPLATES[label]).fill(slots)
        + rng.choice(TICKET_CLOSERS)
    )
    return AgentCall(
        "classify_ticket", _body("classify_ticket", TICKET_LEAD + text, temperature=0), {"content": label}
    )


def _planning(rng: random.Random, i: int) -> AgentCall:
    slots = {"n": rng.randint(2, 30), "city": rng.choice(CITIES), "skill": rng.choice(SKILLS)}
    slots["tool"] = rng.choice(PLAN_TOOLS)
    goal = rng.choice(PLAN_TEMPLATES).fill(slots)
    return AgentCall(PLANNING, _body(PLANNING, goal), {"content": None})


_MAKERS: dict[str, Callable[[random.Random, int], AgentCall]] = {
    "pick_tool": _pick_tool,
    "extract_contact": _extract_contact,
    "classify_ticket": _classify_ticket,
    PLANNING: _planning,
}


def _distinct(
    maker: Callable[[random.Random, int], AgentCall], rng: random.Random, n: int
) -> list[AgentCall]:
    """``n`` calls with distinct user messages (a few repeats only if the vocabulary runs out)."""
    calls: list[AgentCall] = []
    seen: set[str] = set()
    for i in range(n):
        call = maker(rng, i)
        for _ in range(50):
            if request_content(call.body["messages"]) not in seen:
                break
            call = maker(rng, i)
        seen.add(request_content(call.body["messages"]))
        calls.append(call)
    return calls


def generate_calls(n_per_subtask: int, n_planning: int, seed: int = 0) -> list[AgentCall]:
    """The agent's traffic: ``n_per_subtask`` calls of each subtask and ``n_planning`` planning
    requests, shuffled; the same seed gives the same list."""
    rng = random.Random(seed)
    calls = [c for s in SUBTASKS for c in _distinct(_MAKERS[s], rng, n_per_subtask)]
    calls += _distinct(_MAKERS[PLANNING], rng, n_planning)
    rng.shuffle(calls)
    return calls


# -- ground truth from a request alone (what the teacher answers) ---------------------------------
def subtask_of(body: dict[str, Any]) -> str | None:
    """Which step sent this request, by its system prompt (the agent's fixed part)."""
    for message in body.get("messages", []):
        if message.get("role") in ("system", "developer"):
            text = message_text(message).strip()
            return next((s for s, prompt in SYSTEM_PROMPTS.items() if prompt == text), None)
    return None


def ground_truth(body: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(subtask, expected) recomputed from the request by the generator's own rules, or None when
    the request is not the agent's. Values are copied from the text as it arrives, so placeholders
    a redacting proxy put in are copied too (and restored by it on the way back)."""
    subtask = subtask_of(body)
    user = request_content(body.get("messages", []))
    if subtask == "pick_tool":
        for tool, (_, _, templates) in TOOL_TEMPLATES.items():
            for template in templates:
                if (args := template.parse(user)) is not None:
                    return subtask, {"tool_calls": [{"name": tool, "arguments": args}]}
    elif subtask == "extract_contact" and user.startswith(EXTRACT_LEAD):
        for template in CONTACT_TEMPLATES:
            if (fields := template.parse(user[len(EXTRACT_LEAD) :])) is not None:
                contact = {"name": fields["name"], "email": fields["email"], "phone": fields.get("phone")}
                return subtask, {"content": json.dumps(contact)}
    elif subtask == "classify_ticket" and user.startswith(TICKET_LEAD):
        text = user[len(TICKET_LEAD) :].lower()
        found = [label for label in LABELS if any(k in text for k in KEYWORDS[label])]
        if len(found) == 1:
            return subtask, {"content": found[0]}
    elif subtask == PLANNING:
        return subtask, {"content": None}
    return None


# -- scoring ---------------------------------------------------------------------------------------
def _tool_calls(message: dict[str, Any]) -> list[tuple[Any, Any]] | None:
    calls = []
    for call in message.get("tool_calls") or []:
        fn = call.get("function") or {}
        args = fn.get("arguments")
        try:
            calls.append((fn.get("name"), json.loads(args) if isinstance(args, str) else args))
        except json.JSONDecodeError:
            return None
    return calls


def _json_fields(text: Any) -> dict[str, Any] | None:
    """A JSON object with its null fields dropped: an omitted optional field equals a null one."""
    try:
        value = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        return None
    return {k: v for k, v in value.items() if v is not None} if isinstance(value, dict) else None


def is_correct(call: AgentCall, message: dict[str, Any]) -> bool:
    """Whether ``message`` (choices[0].message as a dict) is what the agent expects: the same tool
    calls with the same parsed arguments, the same JSON object, the same label (stripped); any
    non-empty text for planning."""
    expected = call.expected
    if "tool_calls" in expected:
        want = [(c["name"], c["arguments"]) for c in expected["tool_calls"]]
        return _tool_calls(message) == want
    content = message.get("content")
    if message.get("tool_calls") or not isinstance(content, str):
        return False
    if expected["content"] is None:
        return bool(content.strip())
    if call.subtask == "extract_contact":
        got = _json_fields(content)
        return got is not None and got == _json_fields(expected["content"])
    return content.strip() == expected["content"]


def run_agent(client: openai.OpenAI, calls: Sequence[AgentCall], stream: bool = False) -> list[AgentResult]:
    """Send each call in turn, as the agent would, reading the daemon's route headers as it goes;
    ``stream``: as a streaming agent, reading the message from its chunks."""
    results = []
    for call in calls:
        start = time.perf_counter()
        raw = client.chat.completions.with_raw_response.create(**call.body, stream=stream)
        parsed: Any = raw.parse()  # a Stream of chunks when streaming, else the completion
        if stream:
            assembled = AssembledMessage()
            for chunk in parsed:
                assembled.add(chunk.model_dump(mode="json", exclude_none=True))
            message = assembled.message
        else:
            message = parsed.choices[0].message.model_dump(mode="json", exclude_none=True)
        latency_ms = (time.perf_counter() - start) * 1000
        results.append(
            AgentResult(
                call=call,
                message=message,
                route=raw.headers.get("X-SLM-Route", ""),
                latency_ms=latency_ms,
                trace_id=raw.headers.get("X-SLM-Trace-Id", ""),
                route_reason=raw.headers.get("X-SLM-Route-Reason", ""),
            )
        )
    return results


def summarize(results: Sequence[AgentResult]) -> dict[str, dict[str, float]]:
    """Per subtask: calls, share answered locally, share correct, p50 latency local and remote (ms;
    0 when none)."""
    out: dict[str, dict[str, float]] = {}
    for subtask in (*SUBTASKS, PLANNING):
        mine = [r for r in results if r.call.subtask == subtask]
        if not mine:
            continue
        local = [r.latency_ms for r in mine if r.route == "local"]
        remote = [r.latency_ms for r in mine if r.route != "local"]
        out[subtask] = {
            "calls": len(mine),
            "local_share": len(local) / len(mine),
            "correct": sum(r.correct for r in mine) / len(mine),
            "p50_local_ms": statistics.median(local) if local else 0.0,
            "p50_remote_ms": statistics.median(remote) if remote else 0.0,
        }
    return out
