"""Checks of the files: names, presence, checksums, index, safetensors headers, tensor shapes."""

from __future__ import annotations

from pathlib import Path

from laplace_hub.artifact.files import (
    MAX_INDEX_BYTES,
    check_file_name,
    read_json_bounded,
    read_safetensors_header,
    sha256_file,
)
from laplace_hub.errors import LaplaceHubError
from laplace_hub.manifest import (
    CARD_NAME,
    FORMAT_NAME,
    INDEX_NAME,
    MANIFEST_NAME,
    SINGLE_FILE_NAME,
    Manifest,
    TensorSpec,
)
from laplace_hub.validate.findings import Report


def check_files(report: Report, folder: Path, manifest: Manifest, checksums: bool) -> set[str]:
    """Check listed files and stray ones; returns the names that exist and are safe to open."""
    usable: set[str] = set()
    for name, entry in manifest.files.items():
        try:
            check_file_name(name, location=f"files.{name}")
        except LaplaceHubError as e:
            report.add_error(e, name)
            continue
        path = folder / name
        if not path.is_file():
            report.add("file.missing", name, "listed in the manifest but not in the folder")
            continue
        if path.stat().st_size != entry.size:
            report.add("file.size", name, f"is {path.stat().st_size} bytes, the manifest says {entry.size}")
        elif checksums and sha256_file(path) != entry.sha256:
            report.add("file.checksum", name, "sha256 differs from the manifest: the file is corrupt or was altered")
        usable.add(name)
    for child in folder.iterdir():
        if child.name.startswith(".") or child.name in (MANIFEST_NAME, CARD_NAME) or child.name in manifest.files:
            continue
        report.add("file.stray", child.name, "not part of the artifact; remove it")
    if not manifest.files:
        report.add("file.missing", "files", "the manifest lists no files")
    return usable


def read_layout(report: Report, folder: Path, manifest: Manifest, usable: set[str]) -> dict[str, str]:
    """Map tensor key → file name, from the index when the artifact is sharded."""
    names = set(manifest.files)
    if INDEX_NAME not in names:
        if names - {SINGLE_FILE_NAME}:
            report.add("index.missing", "files", f"several tensor files but no {INDEX_NAME}")
        if SINGLE_FILE_NAME not in usable:
            return {}
        return {key: SINGLE_FILE_NAME for key in _header_keys(report, folder, SINGLE_FILE_NAME)}
    if INDEX_NAME not in usable:
        return {}
    try:
        index = read_json_bounded(folder / INDEX_NAME, MAX_INDEX_BYTES, code="index.invalid")
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except LaplaceHubError as e:
        report.add_error(e, INDEX_NAME)
        return {}
    except (KeyError, TypeError):
        report.add("index.invalid", INDEX_NAME, "needs a weight_map object of key -> shard file")
        return {}
    layout: dict[str, str] = {}
    for key, shard in weight_map.items():
        try:
            check_file_name(str(shard), location=f"{INDEX_NAME}:{key}")
        except LaplaceHubError as e:
            report.add_error(e, INDEX_NAME)
            continue
        if shard not in names:
            report.add("index.missing_shard", f"{INDEX_NAME}:{key}", f"points to {shard}, not listed in files")
        elif shard in usable:
            layout[key] = shard
    for shard in sorted(set(layout.values())):
        in_file = set(_header_keys(report, folder, shard))
        for key in sorted({k for k, s in layout.items() if s == shard} - in_file):
            report.add("index.inconsistent", f"{INDEX_NAME}:{key}", f"index says {shard} holds it; it does not")
            del layout[key]
    return layout


def _header_keys(report: Report, folder: Path, name: str) -> list[str]:
    try:
        header = read_safetensors_header(folder / name)
    except LaplaceHubError as e:
        report.add_error(e, name)
        return []
    if not header.metadata.get("format", "").startswith(f"{FORMAT_NAME}/"):
        report.add("file.metadata", name, f"safetensors metadata must hold format '{FORMAT_NAME}/MAJOR.MINOR'")
    for key, entry in header.tensors.items():
        report.headers[key] = entry
    return list(header.tensors)


def check_tensors(report: Report, layout: dict[str, str], expected: dict[str, TensorSpec]) -> None:
    """Every referenced tensor exists with the implied shape and dtype; nothing unreferenced."""
    for key, spec in expected.items():
        header = report.headers.get(key)
        if key not in layout or header is None:
            report.add("tensor.missing", key, f"referenced at {spec.where} but stored nowhere")
        elif header.shape != spec.shape:
            report.add("tensor.shape", key, f"stored as {list(header.shape)}, {spec.where} implies {list(spec.shape)}")
        elif header.dtype != spec.dtype:
            report.add("tensor.dtype", key, f"stored as {header.dtype}, the manifest says {spec.dtype}")
    for key in sorted(report.headers.keys() - expected.keys()):
        report.add("tensor.unreferenced", key, "stored but no block references it; remove it")
