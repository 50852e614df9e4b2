"""The rule runner: every rule of the spec, in one order, reporting to a sink.

``open`` → :func:`read` (manifest bytes → bounded JSON → models → cross-field rules → file sizes
and budget → checksums → index and headers → tensor shapes → values) → :class:`Reading` →
:class:`DiskTensors` (each tensor's values checked on first load) → codec → block.
:meth:`Artifact.open` runs it with :class:`FirstError`, :func:`laplace_hub.validate.validate`
with a :class:`Report`: one rule set, two ways of reporting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import Tensor

from laplace_hub.artifact.files import (
    DEFAULT_MAX_BYTES,
    MAX_MANIFEST_BYTES,
    check_unchanged,
    read_json_bounded,
    regular_size,
)
from laplace_hub.artifact.findings import Sink
from laplace_hub.artifact.rules_files import Layout, check_files, check_tensors, read_layout
from laplace_hub.artifact.rules_manifest import check_semantics, parse_into, too_wide
from laplace_hub.artifact.structures import Context, codec_for
from laplace_hub.artifact.values import check_tensor
from laplace_hub.errors import ArtifactError, LaplaceHubError
from laplace_hub.manifest import (
    MANIFEST_NAME,
    Manifest,
    TensorSpec,
    expected_tensors,
)


@dataclass
class Reading:
    """What the rules parsed on the way: enough to read tensors without parsing anything again."""

    folder: Path
    manifest: Manifest
    expected: dict[str, TensorSpec]
    layout: Layout = field(default_factory=Layout)
    tensors: DiskTensors | None = None  # what checked the values, with its files still mapped


def read(
    folder: Path, sink: Sink, *, checksums: bool, values: bool, max_bytes: int = DEFAULT_MAX_BYTES
) -> Reading | None:
    """Run the rules on an artifact folder; ``None`` when no manifest could be parsed."""
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is a file, not an artifact folder"
        sink.add("artifact.not_found", str(folder), f"{what}; an artifact is a folder holding {MANIFEST_NAME}")
        return None
    try:
        manifest_size = regular_size(folder / MANIFEST_NAME)
    except LaplaceHubError as e:
        sink.error(e, MANIFEST_NAME)
        return None
    if manifest_size is None:
        sink.add("manifest.missing", MANIFEST_NAME, "no manifest: this folder is not a laplace-hub artifact")
        return None
    try:
        raw = read_json_bounded(folder / MANIFEST_NAME, MAX_MANIFEST_BYTES, code="manifest.json_invalid")
    except LaplaceHubError as e:
        sink.error(e, MANIFEST_NAME)
        return None
    manifest = parse_into(sink, raw)
    if manifest is None:
        return None
    check_semantics(sink, manifest)
    try:
        expected = expected_tensors(manifest)
    except LaplaceHubError as e:  # manifest.tensor_conflict, manifest.param, manifest.schema (a rank)
        sink.error(e, "modules")
        return None
    reading = Reading(folder, manifest, expected)
    reading.layout = check_files(sink, folder, manifest, checksums, max_bytes)
    if reading.layout.over_budget:
        return reading
    read_layout(sink, folder, manifest, reading.layout)
    check_tensors(sink, reading.layout, expected)
    if values and not too_wide(manifest):  # past the factor-side bound, the value rules are the work it prevents
        tensors = reading.tensors = DiskTensors(reading, sink)
        for key in expected:
            if reading.layout.readable(key):
                tensors(key)
        check_blocks(sink, reading, tensors)
    return reading


class DiskTensors:
    """Tensors read on demand from the artifact's files, each checked against the value rules once."""

    def __init__(self, reading: Reading, sink: Sink) -> None:
        self.reading = reading
        self.sink = sink
        self._handles: dict[str, Any] = {}
        self._checked: set[str] = set()
        self.failed: set[str] = set()  # keys whose values broke a rule (a collecting sink goes on)

    def __call__(self, key: str) -> Tensor:
        name = self.reading.layout.files[key]
        try:
            tensor: Tensor = self._handle(name).get_tensor(key)
        except ArtifactError:
            raise
        except Exception as e:  # safetensors' own errors, OSError: the file changed or broke under us
            raise ArtifactError(f"cannot read tensor {key!r}: {e}", location=name, code="file.bad_safetensors") from e
        if key not in self._checked:
            self._checked.add(key)
            if not check_tensor(self.sink, key, tensor, self.reading.expected[key]):
                self.failed.add(key)
        return tensor

    def pin(self) -> None:
        """Map every tensor file now: later reads see these bytes even if the folder or a file is replaced.

        (A file rewritten in place, or truncated, under a mapping is not protected: writers of this
        package and of the Hugging Face cache replace files, they never rewrite them.)
        """
        for name in sorted(set(self.reading.layout.files.values())):
            try:
                self._handle(name)
            except ArtifactError:
                raise
            except Exception as e:
                raise ArtifactError(f"cannot be mapped: {e}", location=name, code="file.bad_safetensors") from e

    def _handle(self, name: str) -> Any:
        if name not in self._handles:
            self._handles[name] = self._open(name)
        return self._handles[name]

    def _open(self, name: str) -> Any:
        """Map a file only if it is still the one checked, before and after the mapping."""
        path = self.reading.folder / name
        seen = self.reading.layout.seen.get(name)
        if seen is not None:
            check_unchanged(path, seen)
        handle = safe_open(str(path), framework="pt")
        if seen is not None:
            check_unchanged(path, seen)
        return handle


def check_blocks(sink: Sink, reading: Reading, get: DiskTensors) -> None:
    """The rules across a block's tensors (each structure's own: e.g. eigenvalues against their tail)."""
    manifest = reading.manifest

    def readable(key: str) -> Tensor | None:
        return get(key) if reading.layout.readable(key) and key not in get.failed else None

    for name, module in manifest.modules.items():
        at = Context.of(manifest, module)
        for index, entry in enumerate(module.blocks):
            codec_for(entry).check(sink, f"modules.{name}.blocks.{index}", entry, at, readable)
