"""What every training-box command leaves behind: JSON for tools, Markdown and charts for people.

Charts are drawn on a bare ``matplotlib.figure.Figure`` rendered by the Agg canvas, never through
pyplot: no display, no GUI backend and no process-wide backend switch, so the training box runs on
a headless server and charts can be drawn from any thread. matplotlib is imported only when a
chart is drawn, so importing this module stays cheap.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from slm_agent.atomic import write_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_DPI = 120
_ROTATE_OVER = 12  # characters: longer candidate names are slanted so they do not overlap


def write_report(folder: Path, name: str, data: BaseModel, markdown: str) -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.md`` in ``folder``; each file is whole or absent."""
    json_path, md_path = Path(folder) / f"{name}.json", Path(folder) / f"{name}.md"
    write_atomic(json_path, (data.model_dump_json(indent=2) + "\n").encode())
    write_atomic(md_path, (markdown if markdown.endswith("\n") else markdown + "\n").encode())
    return json_path, md_path


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured table; numeric columns are right-aligned so figures line up."""
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"table row has {len(row)} cells for {len(headers)} headers: {row!r}")
    numeric = [_is_numeric_column([row[i] for row in rows]) for i in range(len(headers))]
    rule = ["---:" if right else "---" for right in numeric]
    lines = [_table_line([_cell(h) for h in headers]), _table_line(rule)]
    lines.extend(_table_line([_cell(value) for value in row]) for row in rows)
    return "\n".join(lines) + "\n"


def _is_numeric_column(values: list[Any]) -> bool:
    present = [v for v in values if v is not None]
    return bool(present) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in present)


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table_line(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def plot_metrics(path: Path, candidates: list[str], metrics: dict[str, list[float]], title: str) -> Path:
    """A grouped bar chart of 0-1 scores: one group per candidate, one bar per metric."""
    for metric, values in metrics.items():
        if len(values) != len(candidates):
            raise ValueError(f"metric {metric!r} has {len(values)} values for {len(candidates)} candidates")
    fig = _figure(width=max(6.0, 2.0 + len(candidates) * (0.4 + 0.45 * len(metrics))), height=4.5)
    ax = fig.subplots()
    width = 0.8 / max(len(metrics), 1)
    for i, (metric, values) in enumerate(metrics.items()):
        shift = (i - (len(metrics) - 1) / 2) * width
        bars = ax.bar([c + shift for c in range(len(candidates))], values, width, label=metric)
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=2, fontsize=8)
    slanted = any(len(c) > _ROTATE_OVER for c in candidates)
    ax.set_xticks(
        range(len(candidates)),
        candidates,
        rotation=25 if slanted else 0,
        ha="right" if slanted else "center",
        rotation_mode="anchor",
    )
    ax.set_ylim(0, 1.1)  # headroom for the labels on bars at 1.0
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    if metrics:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(fig, Path(path))


def plot_curve(
    path: Path, series: dict[str, list[tuple[float, float]]], title: str, xlabel: str, ylabel: str
) -> Path:
    """Lines of (x, y) points, e.g. train and val loss against step."""
    fig = _figure(width=7.0, height=4.5)
    ax = fig.subplots()
    for name, points in series.items():
        xs, ys = [x for x, _ in points], [y for _, y in points]
        # Sparse series (val loss is measured every N steps) need markers to be seen at all.
        ax.plot(xs, ys, label=name, linewidth=1.5, marker="o" if len(points) <= 30 else None, markersize=4)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(frameon=False)
    return _save(fig, Path(path))


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI)


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    write_atomic(path, buffer.getvalue())
    return path
