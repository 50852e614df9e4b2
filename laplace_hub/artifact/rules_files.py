"""Rules of the files: names, presence, sizes, checksums, index, safetensors headers, tensor shapes.

Nothing is hashed, mapped or parsed before the sizes the manifest declares are checked against the
real files and against the caller's byte budget; nothing that is not a regular file is opened.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from laplace_hub.artifact.files import (
    MAX_INDEX_BYTES,
    FileIdentity,
    TensorHeader,
    check_file_name,
    check_unchanged,
    identity,
    read_json_bounded,
    read_safetensors_header,
    regular_size,
    regular_stat,
    sha256_file,
    unreadable,
)
from laplace_hub.artifact.findings import Sink
from laplace_hub.errors import LaplaceHubError
from laplace_hub.manifest import (
    CARD_NAME,
    FORMAT_NAME,
    INDEX_NAME,
    MANIFEST_NAME,
    SINGLE_FILE_NAME,
    VERSION_PART,
    Manifest,
    TensorSpec,
)

_FORMAT = re.compile(rf"{FORMAT_NAME}/({VERSION_PART})\.{VERSION_PART}")


@dataclass
class Layout:
    """Where each tensor is: key → file, the parsed headers, and the files that failed a rule."""

    files: dict[str, str] = field(default_factory=dict)
    headers: dict[str, TensorHeader] = field(default_factory=dict)
    usable: set[str] = field(default_factory=set)
    broken: set[str] = field(default_factory=set)
    seen: dict[str, FileIdentity] = field(default_factory=dict)  # each file as checked: later reads refuse another
    over_budget: bool = False  # file.budget: nothing else about the files is judged (SPEC.md §8.4)

    def readable(self, key: str) -> bool:
        """Whether ``key`` has a file and neither it nor its file failed a rule."""
        return key in self.files and not {key, self.files[key]} & self.broken


def check_files(sink: Sink, folder: Path, manifest: Manifest, checksums: bool, max_bytes: int) -> Layout:
    """Check listed files and stray ones; returns a layout whose ``usable`` files are safe to open.

    A file that fails its size or checksum is still opened for its header (so that a validator
    names what is wrong inside), but no value of it is read.
    """
    layout = Layout()
    declared = manifest.file_bytes()
    if declared > max_bytes:
        sink.add(
            "file.budget",
            "files",
            f"the manifest declares {declared} bytes, above this reader's limit of {max_bytes} "
            "(raise `max_bytes` if you trust the artifact)",
        )
        layout.broken |= set(manifest.files)
        layout.over_budget = True
        return layout
    for name, entry in manifest.files.items():
        try:
            check_file_name(name, location=f"files.{name}")
            info = regular_stat(folder / name)
            if info is None:
                layout.broken.add(name)
                sink.add("file.missing", name, "listed in the manifest but not in the folder")
                continue
            layout.usable.add(name)
            layout.seen[name] = identity(info)
            if info.st_size != entry.size:
                layout.broken.add(name)
                sink.add("file.size", name, f"is {info.st_size} bytes, the manifest says {entry.size}")
            elif checksums and sha256_file(folder / name) != entry.sha256:
                layout.broken.add(name)
                sink.add("file.checksum", name, "sha256 differs from the manifest: the file is corrupt or was altered")
            elif checksums:
                check_unchanged(folder / name, layout.seen[name])  # the bytes hashed are the file checked
        except LaplaceHubError as e:
            layout.usable.discard(name)
            layout.broken.add(name)
            sink.error(e, name)
    _check_stray(sink, folder, manifest)
    if not manifest.files:
        sink.add("file.missing", "files", "the manifest lists no files")
    return layout


def _check_stray(sink: Sink, folder: Path, manifest: Manifest) -> None:
    try:
        names = sorted(os.listdir(folder))
    except OSError as e:
        sink.error(unreadable(folder, e), folder.name)
        return
    for name in names:
        if name == CARD_NAME:
            try:  # a link here would let a push upload what it points to
                regular_size(folder / name)
            except LaplaceHubError as e:
                sink.error(e, name)
        if name.startswith(".") or name in (MANIFEST_NAME, CARD_NAME) or name in manifest.files:
            continue
        sink.add("file.stray", name.encode("utf-8", "backslashreplace").decode(), "not part of the artifact; remove it")


def read_layout(sink: Sink, folder: Path, manifest: Manifest, layout: Layout) -> None:
    """Map tensor key → file name through the index (sharded) or the one file's header.

    Where the index is absent or unusable, keys are placed by the headers, so that one broken
    index is one finding, not one per tensor.
    """
    names = set(manifest.files)
    held = {
        name: _header_keys(sink, folder, name, manifest, layout)
        for name in sorted(names - {INDEX_NAME})
        if name in layout.usable
    }
    weight_map: dict[str, str] | None = None
    if INDEX_NAME not in names:
        if names - {SINGLE_FILE_NAME}:
            sink.add("index.missing", "files", f"tensor files other than {SINGLE_FILE_NAME} need {INDEX_NAME}")
    elif INDEX_NAME in layout.usable and INDEX_NAME not in layout.broken:
        weight_map = _weight_map(sink, folder)
    if weight_map is None:
        for name, keys in held.items():
            for key in keys:
                layout.files.setdefault(key, name)
        return
    for key, shard in weight_map.items():
        try:
            check_file_name(shard, location=f"{INDEX_NAME}:{key}")
        except LaplaceHubError as e:
            layout.broken.add(key)
            sink.error(e, INDEX_NAME)
            continue
        if shard not in names or shard == INDEX_NAME:
            layout.broken.add(key)
            sink.add(
                "index.missing_shard", f"{INDEX_NAME}:{key}", f"points to {shard}, not a tensor file listed in files"
            )
        elif key in held.get(shard, ()):
            layout.files[key] = shard
        else:
            layout.broken.add(key)
            if shard in held:
                sink.add("index.inconsistent", f"{INDEX_NAME}:{key}", f"index says {shard} holds it; it does not")
    for name, keys in held.items():
        for key in sorted(set(keys) - set(weight_map)):
            sink.add("index.inconsistent", f"{name}:{key}", f"{name} holds it but the index does not list it")
    for name in sorted(names - {INDEX_NAME} - set(weight_map.values())):
        sink.add("index.inconsistent", name, "a tensor file the index does not name: every tensor file is a shard")


def _weight_map(sink: Sink, folder: Path) -> dict[str, str] | None:
    try:
        index = read_json_bounded(folder / INDEX_NAME, MAX_INDEX_BYTES, code="index.invalid")
    except LaplaceHubError as e:
        sink.error(e, INDEX_NAME)
        return None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
        sink.add("index.invalid", INDEX_NAME, "needs a weight_map object of key -> shard file name")
        return None
    return weight_map


def _header_keys(sink: Sink, folder: Path, name: str, manifest: Manifest, layout: Layout) -> list[str]:
    try:
        header = read_safetensors_header(folder / name)
    except LaplaceHubError as e:
        layout.broken.add(name)
        sink.error(e, name)
        return []
    match = _FORMAT.fullmatch(header.metadata.get("format", "")) if len(header.metadata) == 1 else None
    if match is None or match[1] != manifest.spec_version.split(".")[0]:
        sink.add(
            "file.metadata",
            name,
            f"safetensors metadata must be one key, format: '{FORMAT_NAME}/MAJOR.MINOR' of the manifest's major",
        )
    for key, entry in header.tensors.items():
        if key in layout.headers:
            sink.add("index.inconsistent", f"{name}:{key}", "the same tensor is stored in two files")
        layout.headers[key] = entry
    return list(header.tensors)


def check_tensors(sink: Sink, layout: Layout, expected: dict[str, TensorSpec]) -> None:
    """Every referenced tensor exists with the implied shape and dtype; nothing unreferenced."""
    for key, spec in expected.items():
        header = layout.headers.get(key)
        if key not in layout.files or header is None:
            if not layout.broken:
                sink.add("tensor.missing", key, f"referenced at {spec.where} but stored nowhere")
        elif header.shape != spec.shape:
            sink.add("tensor.shape", key, f"stored as {list(header.shape)}, {spec.where} implies {list(spec.shape)}")
            layout.broken.add(key)
        elif header.dtype != spec.dtype:
            sink.add("tensor.dtype", key, f"stored as {header.dtype}, the manifest says {spec.dtype}")
            layout.broken.add(key)
    for key in sorted(layout.headers.keys() - expected.keys()):
        sink.add("tensor.unreferenced", key, "stored but no block references it; remove it")
