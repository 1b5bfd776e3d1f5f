"""The conversion report: how much of the agents' traffic moved to the device, how well it agrees
with the remote, how much faster and cheaper it is. One model for the CLI, HTTP and the TUI."""

from slm_agent.runtime.report.build import build_report, settings_price
from slm_agent.runtime.report.markdown import render_markdown, sparkline
from slm_agent.runtime.report.model import Bucket, ConversionReport, Price, TaskConversion
from slm_agent.runtime.report.period import parse_since

__all__ = [
    "Bucket",
    "ConversionReport",
    "Price",
    "TaskConversion",
    "build_report",
    "parse_since",
    "render_markdown",
    "settings_price",
    "sparkline",
]
