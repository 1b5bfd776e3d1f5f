"""Tasks: named subtasks an agent delegates, declared in TOML files.

Built-in tasks ship with the package; files in the tasks dir add tasks or override built-ins
of the same name.
"""

from __future__ import annotations

import builtins
import json
import logging
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from slm_agent.errors import BadRequestError, ConflictError, NotFoundError
from slm_agent.models.manifest import PromptFormat

log = logging.getLogger(__name__)

TASK_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
# What closes each few-shot example: a base model that has written its answer goes on with it.
EXAMPLE_END = "\n\n"

Routing = Literal["local", "remote", "auto"]


class Sampling(BaseModel):
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, ge=1)


class Promotion(BaseModel):
    """When a task's adapter may answer for the remote, and when it must stop (shadow mode)."""

    target: float = Field(
        0.95, gt=0, le=1, description="Agreement with the remote (Wilson lower bound) needed to go live."
    )
    min_pairs: int = Field(50, ge=1, description="Shadow pairs (local vs remote) needed before promotion.")
    shadow_sample: float = Field(
        0.05, ge=0, le=1, description="Share of live calls still answered by the remote too and compared."
    )
    drift_window: int = Field(
        20, ge=5, description="Recent pairs whose agreement decides a demotion when the remote drifts."
    )


class Example(BaseModel):
    input: str
    output: str = Field(description="The exact answer text, e.g. compact JSON for json tasks.")
    tools: list[dict[str, Any]] | None = Field(None, description="tool_call examples: the tools offered.")


class Task(BaseModel):
    """A subtask with its prompt, output contract, adapter and routing policy."""

    name: str
    description: str = ""
    kind: Literal["json", "label", "tool_call", "text"] = Field(
        "text", description="Output contract: JSON schema, one label, one tool call, or free text."
    )
    instructions: str = Field("", description="Fixed instructions at the top of the prompt.")
    input_label: str = "Input"
    output_label: str = "Output"
    output_schema: dict[str, Any] | None = Field(None, description="kind=json: the answer's JSON schema.")
    labels: list[str] = Field(default_factory=list, description="kind=label: the closed set of labels.")
    tools: list[dict[str, Any]] = Field(
        default_factory=list, description="kind=tool_call: default tools when a request brings none."
    )
    examples: list[Example] = Field(default_factory=list, description="Few-shot examples.")
    adapter: str | None = Field(None, description="LoRA adapter (store name) serving this task.")
    adapter_scale: float = Field(1.0, ge=0, le=4)
    prompt_format: PromptFormat | None = Field(None, description="Overrides the base model's prompt format.")
    sampling: Sampling = Field(default_factory=Sampling)
    routing: Routing = Field("local", description="local, remote, or auto (escalate when unsure).")
    planner: bool = Field(False, description="Planning task: the router sends it to the remote LLM.")
    confidence_threshold: float | None = Field(
        None, description="auto routing: escalate when the mean token log-prob is below this."
    )
    sync: bool = Field(True, description="Whether this task's traces may leave the device.")
    form: Literal["task", "chat"] = Field(
        "task",
        description="task: a prompt built from instructions and an input; chat: the agent's own request "
        "(messages, tools, response_format) is the input and the remote's answer the label.",
    )
    signature: str | None = Field(
        None,
        description="Template signature of the agent requests this task covers (contracts/signature.py).",
    )
    centroid: list[float] | None = Field(
        None, description="Mean embedding of the task's requests, for matching calls by content."
    )
    match_threshold: float | None = Field(
        None, ge=-1, le=1, description="Cosine to the centroid a request needs to match this task."
    )
    promotion: Promotion = Field(default_factory=Promotion)
    source: str = Field("builtin", description="Where the task was defined (file path or builtin).")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not TASK_NAME_RE.match(value):
            raise ValueError(f"invalid task name {value!r}: lowercase letters, digits, '_' and '-'")
        return value

    @model_validator(mode="after")
    def _contract(self) -> Task:
        if self.kind == "json" and not self.output_schema:
            raise ValueError(f"task {self.name!r} is kind=json but has no output_schema")
        if self.kind == "label" and len(self.labels) < 2:
            raise ValueError(f"task {self.name!r} is kind=label but has fewer than two labels")
        return self

    def render_example(self, example: Example) -> str:
        return f"{self.input_label}: {example.input}\n{self.output_label}: {example.output}{EXAMPLE_END}"

    def call_separator(self) -> str:
        """Between two calls of one answer (kind=tool_call): a new line under the output label, as
        an example with several calls writes them."""
        return f"\n{self.output_label}: "

    def prefix(self) -> str:
        """The fixed part of the prompt, identical for every call: cached by the engine."""
        parts = [self.instructions.strip() + "\n\n"] if self.instructions else []
        parts.extend(
            self.render_tool_example(e) if e.tools else self.render_example(e) for e in self.examples
        )
        return "".join(parts)

    def body(self, value: str, tools: list[dict[str, Any]] | None = None) -> str:
        head = render_tools(tools) if self.kind == "tool_call" and tools else ""
        return f"{head}{self.input_label}: {value}\n{self.output_label}:"

    def render_tool_example(self, example: Example) -> str:
        return render_tools(example.tools or []) + self.render_example(example)


def render_tools(tools: list[dict[str, Any]]) -> str:
    """Tools as compact lines: name(params): description."""
    lines = ["Tools:"]
    for tool in tools:
        fn = tool.get("function", tool)
        params = fn.get("parameters") or {}
        props = params.get("properties") or {}
        args = ", ".join(f"{k}: {v.get('type', 'any')}" for k, v in props.items())
        lines.append(f"- {fn.get('name')}({args}): {fn.get('description', '')}".rstrip(": "))
    return "\n".join(lines) + "\n"


def parse_task(data: dict[str, Any], source: str) -> Task:
    try:
        return Task.model_validate({**data, "source": source})
    except ValidationError as exc:
        raise BadRequestError(f"invalid task definition in {source}: {exc}") from exc


def load_task_file(path: Path) -> Task:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise BadRequestError(f"cannot read task file {path}: {exc}") from exc
    data.setdefault("name", path.stem)
    return parse_task(data, str(path))


def builtin_tasks() -> list[Task]:
    folder = resources.files("slm_agent.contracts").joinpath("builtin_tasks")
    tasks = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            data = tomllib.loads(entry.read_text())
            tasks.append(parse_task(data, "builtin"))
    return tasks


class TaskRegistry:
    """Built-in tasks overlaid by the TOML files of the tasks dir."""

    def __init__(self, tasks_dir: Path) -> None:
        self.tasks_dir = Path(tasks_dir)
        self._tasks: dict[str, Task] = {}
        self._bindings: dict[str, str] = {}
        self._routing: dict[str, Routing] = {}  # admin overrides: they outlive reloads of the files
        # Bumped by every reload: indexes built over the tasks (the matcher's) rebuild when it moves.
        self.generation = 0
        self._fingerprint: tuple[object, ...] = ()
        self.reload()

    def refresh(self) -> bool:
        """Reload if the tasks dir changed since the last load (a file added, removed or rewritten).

        A task accepted on the training box and pulled, or written by ``tasks add``, is picked up
        without a restart; the check is a listing and a stat per file, cheap enough to run often.
        """
        if self._dir_fingerprint() == self._fingerprint:
            return False
        self.reload()
        return True

    def _dir_fingerprint(self) -> tuple[object, ...]:
        try:
            files = sorted(self.tasks_dir.glob("*.toml"))
            stats = [(p.name, (st := p.stat()).st_mtime_ns, st.st_size) for p in files]
            return (self.tasks_dir.stat().st_mtime_ns, *stats)
        except OSError:  # the dir (or a file being replaced) is missing: compare as "no files"
            return ()

    def reload(self) -> None:
        self._fingerprint = self._dir_fingerprint()
        tasks = {t.name: t for t in builtin_tasks()}
        if self.tasks_dir.is_dir():
            for path in sorted(self.tasks_dir.glob("*.toml")):
                try:
                    task = load_task_file(path)
                except BadRequestError as exc:
                    log.error("skipping task file: %s", exc)
                    continue
                tasks[task.name] = task
        for name, adapter in self._bindings.items():
            if name in tasks and tasks[name].adapter is None:
                tasks[name] = tasks[name].model_copy(update={"adapter": adapter})
        for name, routing in self._routing.items():
            if name in tasks:
                tasks[name] = tasks[name].model_copy(update={"routing": routing})
        self._tasks = tasks
        self.generation += 1

    def list(self) -> list[Task]:
        return list(self._tasks.values())

    def get(self, name: str) -> Task:
        task = self._tasks.get(name)
        if task is None:
            known = ", ".join(sorted(self._tasks)) or "none"
            raise NotFoundError(f"unknown task {name!r}; known tasks: {known}", param="task")
        return task

    def has(self, name: str) -> bool:
        return name in self._tasks

    def add_file(self, path: Path, replace: bool = False) -> Task:
        task = load_task_file(Path(path))
        target = self.tasks_dir / f"{task.name}.toml"
        if target.exists() and not replace:
            raise ConflictError(f"task {task.name!r} already exists at {target}; remove it first")
        self.tasks_dir.mkdir(parents=True, exist_ok=True)
        target.write_text(Path(path).read_text() if Path(path).stem == task.name else _with_name(path, task))
        self.reload()
        return self.get(task.name)

    def remove(self, name: str) -> Path:
        target = self.tasks_dir / f"{name}.toml"
        if not target.exists():
            if self.has(name):
                raise BadRequestError(
                    f"task {name!r} is built in; override it with a file instead of removing it"
                )
            raise NotFoundError(f"unknown task {name!r}")
        target.unlink()
        self.reload()
        return target

    def bind_adapter(self, name: str, adapter: str) -> Task | None:
        """Serve a task with a trained adapter (one pulled from the training box).

        A task whose definition names its adapter keeps it: a pin in a task file is the user's word.
        """
        if not self.has(name) or self.pinned(name):
            return None
        self._bindings[name] = adapter
        task = self.get(name).model_copy(update={"adapter": adapter})
        self._tasks[name] = task
        return task

    def unbind_adapter(self, adapter: str) -> builtins.list[str]:
        """Undo ``bind_adapter`` for every task ``adapter`` serves (it was unloaded); returns them.

        A pin in a task file stays: only the user's edit of the file removes it.
        """
        names = sorted(name for name, bound in self._bindings.items() if bound == adapter)
        for name in names:
            del self._bindings[name]
        if names:
            self.reload()
        return names

    def pinned(self, name: str) -> bool:
        task = self.get(name)
        return task.adapter is not None and self._bindings.get(name) != task.adapter

    def set_routing(self, name: str, routing: Routing) -> Task:
        """Change a task's routing policy for this daemon's lifetime (an admin action)."""
        task = self.get(name).model_copy(update={"routing": routing})
        self._tasks[name] = task
        self._routing[name] = routing
        return task


def _with_name(path: Path, task: Task) -> str:
    text = Path(path).read_text()
    return text if re.search(r"(?m)^name\s*=", text) else f"name = {json.dumps(task.name)}\n" + text
