"""``slm-agent train discover``: propose tasks from the traces the collector gathered."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Table

from slm_agent.collector.settings import CollectorSettings
from slm_agent.commands import Command, json_option, print_json
from slm_agent.console import console
from slm_agent.contracts.centroids import MATCH_MAX_TOKENS
from slm_agent.errors import BadRequestError
from slm_agent.models.encoder import Encoder
from slm_agent.progress import rich_progress
from slm_agent.quantize.encoder import ensure_encoder
from slm_agent.runtime.config import load_settings
from slm_agent.train.data.collected import read_traces
from slm_agent.train.discovery.discover import (
    DEFAULT_MIN_SIZE,
    DEFAULT_THRESHOLD,
    DiscoveryReport,
    TaskProposal,
    accept,
)
from slm_agent.train.discovery.discover import discover as discover_traces
from slm_agent.train.report import markdown_table, write_report

_COLUMNS = ["#", "name", "kind", "traces", "share", "contract", "form", "example"]


def contract(proposal: TaskProposal) -> str:
    """The output contract in a few words: labels, JSON fields or tool names."""
    if proposal.kind == "label":
        return ", ".join(proposal.labels)
    if proposal.kind == "json" and proposal.output_schema:
        return "{" + ", ".join(proposal.output_schema.get("properties", {})) + "}"
    if proposal.kind == "tool_call":
        return ", ".join(str(t.get("function", t).get("name")) for t in proposal.tools)
    return "free text"


def _cells(p: TaskProposal, *, existing: str, width: int) -> list[Any]:
    """One proposal's row under ``_COLUMNS``; the example input is cut to ``width`` characters."""
    name = p.name + (f" ({existing})" if p.existing_task == p.name else "")
    example = p.example_inputs[0] if p.example_inputs else ""
    return [p.cluster, name, p.kind, p.size, f"{p.share:.0%}", contract(p), p.form, example[:width]]


def _flat(text: str) -> str:
    return " ".join(text.split())


def report_markdown(report: DiscoveryReport) -> str:
    """A readable report: a table of proposals, then each one's examples."""
    rows = [
        [_flat(c) if isinstance(c, str) else c for c in _cells(p, existing="existing task", width=80)]
        for p in report.proposals
    ]
    lines = [
        "# Task discovery",
        "",
        f"{report.traces} traces read from `{report.data or '?'}`, {report.with_input} with an input "
        f"({report.planning} planning requests, never proposed), in {report.clusters} groups "
        f"({report.templates} by template signature, the rest by content at threshold {report.threshold}); "
        f"{len(report.proposals)} groups of at least {report.min_size} traces cover {report.covered} of "
        f"them. Encoder: {report.encoder}, {report.seconds:.1f}s.",
        "",
        markdown_table(_COLUMNS, rows).rstrip("\n"),
    ]
    for p in report.proposals:
        lines += ["", f"## {p.cluster}. {p.name}", ""]
        if p.form == "chat":
            lines += [
                f"One agent step, served in the agent's own request form: signature "
                f"`{p.signature or 'none (matched by content)'}`, match threshold {p.match_threshold}.",
                "",
            ]
        else:
            lines += [p.instructions, ""]
        if p.keywords:
            lines += [f"Distinctive words: {', '.join(p.keywords)}.", ""]
        lines += [f"- `{_code(e.input)}` → `{_code(e.output)}`" for e in p.examples]
    lines += ["", "Accept one with `slm-agent train discover --accept N [--name NAME]`."]
    return "\n".join(lines) + "\n"


def _code(text: str) -> str:
    return _flat(text).replace("|", "\\|")


# cls=Command: the command runs on its own too (tests, embedding), not only under `train`.
@click.command("discover", cls=Command)
@click.option(
    "--data", help="Collected traces: a folder or fsspec URL (default: the collector's data setting)."
)
@click.option("--task", help="Only traces already tagged with this task.")
@click.option(
    "--min-size",
    type=click.IntRange(min=1),
    default=DEFAULT_MIN_SIZE,
    show_default=True,
    help="Smallest cluster worth a task.",
)
@click.option(
    "--threshold",
    type=click.FloatRange(0, 2),
    default=DEFAULT_THRESHOLD,
    show_default=True,
    help="Cosine distance under which clusters merge (average linkage); lower splits finer.",
)
@click.option(
    "--encoder",
    "encoder_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="An int8 encoder folder (default: built in the data dir on first use).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write discover.json and discover.md to this folder.",
)
@click.option("--accept", "accept_id", type=int, help="Write proposal N to the daemon's tasks dir.")
@click.option("--name", help="With --accept: the task's name (default: the suggested one).")
@click.option("--replace", is_flag=True, help="With --accept: replace a task file of the same name.")
@json_option(help="Print the report as JSON.")
def discover(
    data: str | None,
    task: str | None,
    min_size: int,
    threshold: float,
    encoder_dir: Path | None,
    out: Path | None,
    accept_id: int | None,
    name: str | None,
    replace: bool,
    as_json: bool,
) -> None:
    """Group collected traces by template, then content, and propose a task for each big group.

    Calls of one agent step (same system prompt, tools, response format) become one chat-shaped
    task; planning requests are never proposed. Accepting a proposal writes its task file and tags
    the traces it covers, so `train dataset NAME` can build its dataset at once.

    \b
    Example usage:
      slm-agent train discover
      slm-agent train discover --data s3://bucket/traces --min-size 20 --out ./discovery
      slm-agent train discover --accept 0 --name extract-contacts
    """
    if (name or replace) and accept_id is None:
        raise click.UsageError("--name and --replace go with --accept N")
    data = data or CollectorSettings().data
    accepted: Path | None = None
    traces = read_traces(data, task=task)
    if encoder_dir is None:
        with rich_progress("building the sentence encoder (first use)", unit="items") as progress:
            encoder_dir = ensure_encoder(on_progress=progress)
    encoder = Encoder(encoder_dir, max_length=MATCH_MAX_TOKENS)  # as the device embeds when matching
    with rich_progress(f"embedding {len(traces)} traces", unit="items") as progress:
        report = discover_traces(
            traces,
            encoder=encoder,
            min_size=min_size,
            threshold=threshold,
            data=data,
            on_progress=progress,
        )
    if accept_id is not None:
        chosen = next((p for p in report.proposals if p.cluster == accept_id), None)
        if chosen is None:
            valid = ", ".join(str(p.cluster) for p in report.proposals) or "none"
            raise BadRequestError(f"there is no proposal {accept_id}; proposals: {valid}", param="accept")
        accepted = accept(chosen, load_settings().tasks_dir, name=name, replace=replace, data=data)
    written = write_report(out, "discover", report, report_markdown(report)) if out is not None else None
    if as_json:
        print_json(
            {**report.model_dump(mode="json"), "accepted": str(accepted) if accepted else None}, indent=None
        )
        return
    _print(report)
    if written:
        console().print(f"wrote {written[0]} and {written[1]}")
    if accepted:
        console().print(
            f"accepted as [bold]{accepted.stem}[/] ({accepted}); tagged its traces: "
            f"`slm-agent train dataset {accepted.stem}` builds its dataset"
        )


def _print(report: DiscoveryReport) -> None:
    table = Table(*_COLUMNS)
    for p in report.proposals:
        table.add_row(*(str(c) for c in _cells(p, existing="existing", width=60)))
    console().print(table)
    console().print(
        f"{report.traces} traces, {report.with_input} with input ({report.planning} planning), "
        f"{report.clusters} groups ({report.templates} by template); "
        f"{len(report.proposals)} proposals cover {report.covered} traces ({report.seconds:.1f}s)"
    )
