"""Reports written by training-box commands: JSON + Markdown pairs, tables and charts."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from slm_agent.train.evaluation.metrics import TaskMetrics
from slm_agent.train.report import markdown_table, plot_curve, plot_metrics, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which a valid PNG has right after the magic bytes."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_write_report_writes_json_and_markdown(tmp_path: Path) -> None:
    folder = tmp_path / "runs" / "eval-1"
    metrics = TaskMetrics(n=2, valid_rate=1.0, exact_match=0.5, f1=0.75, primary=0.5)
    json_path, md_path = write_report(folder, "eval", metrics, "# Eval\n\nexact 0.5")
    assert (json_path, md_path) == (folder / "eval.json", folder / "eval.md")
    assert TaskMetrics.model_validate(json.loads(json_path.read_text())) == metrics
    assert json_path.read_text().startswith('{\n  "n": 2,')
    assert md_path.read_text() == "# Eval\n\nexact 0.5\n"
    assert sorted(p.name for p in folder.iterdir()) == ["eval.json", "eval.md"]


def test_write_report_replaces_an_old_report(tmp_path: Path) -> None:
    old = TaskMetrics(n=1, valid_rate=0.0, exact_match=0.0, f1=0.0, primary=0.0)
    new = old.model_copy(update={"n": 9})
    write_report(tmp_path, "eval", old, "old\n")
    json_path, md_path = write_report(tmp_path, "eval", new, "new\n")
    assert json.loads(json_path.read_text())["n"] == 9
    assert md_path.read_text() == "new\n"


def test_markdown_table_formats_cells() -> None:
    table = markdown_table(
        ["candidate", "exact", "latency", "n", "ok"],
        [
            ["base|q4", 0.5, None, 10, True],
            ["adapter\nv2", 2 / 3, 12.34567, 10, False],
        ],
    )
    assert table == (
        "| candidate | exact | latency | n | ok |\n"
        "| --- | ---: | ---: | ---: | --- |\n"
        "| base\\|q4 | 0.500 | — | 10 | True |\n"
        "| adapter v2 | 0.667 | 12.346 | 10 | False |\n"
    )


def test_markdown_table_without_rows_and_ragged_rows() -> None:
    assert markdown_table(["a", "b"], []) == "| a | b |\n| --- | --- |\n"
    with pytest.raises(ValueError, match="2 cells for 3 headers"):
        markdown_table(["a", "b", "c"], [[1, 2]])


def test_plot_metrics_writes_a_png(tmp_path: Path) -> None:
    path = plot_metrics(
        tmp_path / "charts" / "eval.png",
        ["base", "adapter-extract-2024-06-01-r8", "remote"],
        {"exact_match": [0.4, 0.8, 0.9], "f1": [0.6, 0.9, 0.95], "valid_rate": [0.7, 1.0, 1.0]},
        "extract: candidates",
    )
    assert path == tmp_path / "charts" / "eval.png"
    width, height = png_size(path)
    assert width >= 600 and height >= 400
    assert [p.name for p in path.parent.iterdir()] == ["eval.png"]


def test_plot_metrics_rejects_a_metric_without_a_value_per_candidate(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'f1' has 1 values for 2 candidates"):
        plot_metrics(tmp_path / "x.png", ["a", "b"], {"f1": [0.5]}, "t")
    assert not (tmp_path / "x.png").exists()


def test_plot_curve_writes_a_png(tmp_path: Path) -> None:
    train = [(float(step), 2.0 / (1 + step / 50)) for step in range(0, 500, 5)]
    val = [(float(step), 2.1 / (1 + step / 60)) for step in range(0, 500, 100)]
    path = plot_curve(tmp_path / "loss.png", {"train": train, "val": val}, "extract: loss", "step", "loss")
    assert png_size(path)[0] >= 600


def test_plot_curve_with_no_series(tmp_path: Path) -> None:
    assert png_size(plot_curve(tmp_path / "empty.png", {}, "nothing yet", "step", "loss"))[0] > 0


def test_charts_need_no_display_and_import_stays_cheap(tmp_path: Path) -> None:
    """A headless training box: no DISPLAY, and pyplot (the part that picks a GUI backend) unused."""
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        import slm_agent.train.report as report
        assert "matplotlib" not in sys.modules, "importing the report module imported matplotlib"
        report.plot_metrics(Path({str(tmp_path)!r}) / "m.png", ["a"], {{"f1": [0.5]}}, "t")
        report.plot_curve(Path({str(tmp_path)!r}) / "c.png", {{"loss": [(0.0, 1.0)]}}, "t", "x", "y")
        assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m.png").read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG_MAGIC
