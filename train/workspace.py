"""Where a task's training artefacts live: ``<workdir>/<task>/{dataset,runs,eval}``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workspace:
    root: Path
    task: str

    @property
    def folder(self) -> Path:
        return self.root / self.task

    @property
    def dataset(self) -> Path:
        return self.folder / "dataset"

    @property
    def runs(self) -> Path:
        return self.folder / "runs"

    def run(self, run_id: str) -> Path:
        return self.runs / run_id

    @property
    def eval(self) -> Path:
        return self.folder / "eval"

    def latest_run(self) -> Path | None:
        """The newest run with a converted adapter, or None."""
        done = sorted(p.parent for p in self.runs.glob("*/adapter.gguf")) if self.runs.is_dir() else []
        return done[-1] if done else None
