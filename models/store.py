"""The local model store: one folder per model, holding the file and its manifest.

    <store>/<name>/manifest.json
    <store>/<name>/<file>.gguf

Files land through a temporary name and a rename, so a crash never leaves a half-written model
that looks whole. Reads trust nothing in the folder: a name is one path component, a manifest's
file lies in its own folder, and no symlink is followed out of the store. Errors name the model,
never a path on this machine, since the daemon echoes them to API callers.
"""

from __future__ import annotations

import builtins
import logging
import os
import shutil
from pathlib import Path

from pydantic import ValidationError

from slm_agent.errors import ConflictError, ModelStoreError, NotFoundError
from slm_agent.models.gguf_info import check_adapter_fits, is_adapter, read_chat_template, read_info
from slm_agent.models.hashing import sha256_file
from slm_agent.models.manifest import NAME_RE, ModelKind, ModelManifest, PromptFormat, check_name
from slm_agent.progress import ProgressFn

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # -- reading ---------------------------------------------------------------------------------
    def list(self, kind: ModelKind | None = None) -> list[ModelManifest]:
        if not self.root.is_dir():
            return []
        manifests = []
        for path in sorted(self.root.glob(f"*/{MANIFEST}")):
            try:
                manifest = ModelManifest.model_validate_json(path.read_text())
            except ValueError as exc:
                log.warning("skipping unreadable manifest %s: %s", path, exc)
                continue
            if kind is None or manifest.kind == kind:
                manifests.append(manifest)
        return manifests

    def has(self, name: str) -> bool:
        return bool(NAME_RE.match(name)) and (self.root / name / MANIFEST).is_file()

    def get(self, name: str) -> ModelManifest:
        folder = self.root / check_name(name)
        path = folder / MANIFEST
        if not path.is_file():
            known = ", ".join(m.name for m in self.list()) or "none"
            raise NotFoundError(f"model {name!r} is not in the store; known models: {known}", param="name")
        if folder.is_symlink() or path.is_symlink():
            raise ModelStoreError(f"model {name!r} is a symlink in the store: add the model itself instead")
        try:
            manifest = ModelManifest.model_validate_json(path.read_text())
        except ValidationError as exc:
            # Field names and rules only: pydantic's own message would echo the offending value.
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'manifest'}: {e['msg']}" for e in exc.errors()
            )
            raise ModelStoreError(
                f"the manifest of model {name!r} is invalid ({problems}); add it again"
            ) from exc
        if manifest.name != name:
            raise ModelStoreError(f"the manifest in folder {name!r} names another model, {manifest.name!r}")
        return manifest

    def path_of(self, manifest: ModelManifest) -> Path:
        """The model's file, checked to be a regular file inside its own folder of the store."""
        folder = self.root / manifest.name
        path = folder / manifest.file
        if folder.is_symlink() or path.is_symlink():
            raise ModelStoreError(
                f"the file of model {manifest.name!r} is a symlink: add the model itself instead"
            )
        try:
            inside = path.resolve(strict=True).parent == folder.resolve(strict=True)
        except OSError:
            inside = False  # missing: the caller reports it
        if not inside and path.exists():
            raise ModelStoreError(f"the file of model {manifest.name!r} lies outside its folder in the store")
        return path

    def check_adapter(self, manifest: ModelManifest, base: ModelManifest) -> Path:
        """The adapter's file, read and checked against ``base`` before llama.cpp gets to see it."""
        path = self.path_of(manifest)
        if not path.is_file():
            raise ModelStoreError(
                f"the file of adapter {manifest.name!r} is missing from the store; add it again"
            )
        if path.stat().st_size != manifest.size:
            raise ModelStoreError(
                f"the file of adapter {manifest.name!r} is {path.stat().st_size} bytes, the manifest says "
                f"{manifest.size}: it is corrupt; add it again"
            )
        base_path = self.path_of(base)
        try:
            check_adapter_fits(path, read_info(path), base_path, base.info or read_info(base_path))
        except ModelStoreError as exc:
            # gguf_info's messages start with a file's absolute path; name the store entries instead.
            reason = exc.message.replace(str(path), f"{manifest.name}/{manifest.file}")
            reason = reason.replace(str(base_path), f"{base.name}/{base.file}")
            raise ModelStoreError(f"adapter {manifest.name!r} cannot be loaded: {reason}") from exc
        return path

    # -- writing ---------------------------------------------------------------------------------
    def add(
        self,
        source: Path,
        *,
        name: str | None = None,
        base: str | None = None,
        tasks: builtins.list[str] | None = None,
        prompt_format: PromptFormat | None = None,
        origin: str | None = None,
        move: bool = False,
        expected_sha256: str | None = None,
        on_progress: ProgressFn | None = None,
    ) -> ModelManifest:
        """Check a GGUF file and add it: base model or LoRA adapter, decided by its header."""
        source = Path(source)
        if not source.is_file():
            raise ModelStoreError(f"{source} does not exist or is not a file")
        info = read_info(source)
        name = name or source.name.removesuffix(".gguf")
        if self.has(name):
            raise ConflictError(
                f"a model named {name!r} is already in the store; remove it first or pick --name"
            )
        kind = ModelKind.lora_adapter if is_adapter(info) else ModelKind.base
        base_manifest = None
        if kind is ModelKind.lora_adapter:
            base_manifest = self._base_for(info.architecture, base)
            check_adapter_fits(source, info, self.path_of(base_manifest), base_manifest.info or info)
        digest = sha256_file(source, on_progress)
        if expected_sha256 and digest != expected_sha256:
            raise ModelStoreError(
                f"{source} has sha256 {digest}, expected {expected_sha256}: the file is corrupt"
            )
        folder = self.root / name
        tmp_folder = self.root / f".{name}.partial"
        shutil.rmtree(tmp_folder, ignore_errors=True)
        tmp_folder.mkdir(parents=True)
        file_name = source.name if source.name.endswith(".gguf") else f"{name}.gguf"
        target = tmp_folder / file_name
        if move:
            shutil.move(source, target)
        else:
            _link_or_copy(source, target)
        manifest = ModelManifest(
            name=name,
            kind=kind,
            file=file_name,
            sha256=digest,
            size=target.stat().st_size,
            architecture=info.architecture,
            file_type=info.file_type,
            tensor_count=info.tensor_count,
            context_length=info.context_length,
            base=base_manifest.name if base_manifest else None,
            base_sha256=base_manifest.sha256 if base_manifest else None,
            lora_alpha=info.lora_alpha,
            lora_rank=info.lora_rank,
            tasks=tasks or [],
            prompt_format=(prompt_format or PromptFormat(chat_template=read_chat_template(source)))
            if kind is ModelKind.base
            else None,
            source=origin or str(source.resolve()),
            info=info,
        )
        (tmp_folder / MANIFEST).write_text(manifest.model_dump_json(indent=2))
        os.replace(tmp_folder, folder)
        log.info("added %s %s (%s)", kind.value, name, manifest.file)
        return manifest

    def rm(self, name: str) -> ModelManifest:
        manifest = self.get(name)
        dependants = [m.name for m in self.list(ModelKind.lora_adapter) if m.base == name]
        if dependants:
            raise ConflictError(
                f"cannot remove {name!r}: adapters {', '.join(dependants)} are built for it; remove them first"
            )
        shutil.rmtree(self.root / name)
        return manifest

    def verify(self, name: str, on_progress: ProgressFn | None = None) -> tuple[bool, str]:
        """Recompute the sha256 of a stored file; (ok, message)."""
        manifest = self.get(name)
        path = self.path_of(manifest)
        if not path.is_file():
            return False, f"file {path} is missing"
        if path.stat().st_size != manifest.size:
            return False, f"size {path.stat().st_size} differs from the manifest's {manifest.size}"
        digest = sha256_file(path, on_progress)
        if digest != manifest.sha256:
            return False, f"sha256 {digest[:12]}… differs from the manifest's {manifest.sha256[:12]}…"
        return True, "ok"

    def _base_for(self, architecture: str, base: str | None) -> ModelManifest:
        if base:
            manifest = self.get(base)
            if manifest.kind is not ModelKind.base:
                raise ModelStoreError(f"{base!r} is a {manifest.kind.value}, not a base model")
            return manifest
        candidates = [m for m in self.list(ModelKind.base) if m.architecture == architecture]
        if not candidates:
            raise ModelStoreError(
                f"no base model with architecture {architecture!r} in the store: add the base model first"
            )
        if len(candidates) > 1:
            names = ", ".join(m.name for m in candidates)
            raise ModelStoreError(f"several base models fit ({names}): pick one with --base")
        return candidates[0]


def _link_or_copy(source: Path, target: Path) -> None:
    # A hard link costs nothing for a 250 MB file on the same filesystem; fall back to a copy.
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
