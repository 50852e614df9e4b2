"""Writing an artifact folder atomically: shards, index, checksums, manifest, then one rename."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from laplace_hub.artifact.files import sha256_file, shard_name
from laplace_hub.errors import ArtifactError, ManifestError
from laplace_hub.manifest import (
    INDEX_NAME,
    MANIFEST_NAME,
    SINGLE_FILE_NAME,
    FileEntry,
    Manifest,
    expected_tensors,
    manifest_json,
    tensor_file_metadata,
    unknown_fields,
)

DEFAULT_MAX_SHARD_BYTES = 2 * 2**30


def _check_tensors(manifest: Manifest, tensors: dict[str, Tensor]) -> None:
    expected = expected_tensors(manifest)
    missing, stray = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
    if missing or stray:
        raise ArtifactError(f"tensors missing {sorted(missing)[:3]} / unreferenced {sorted(stray)[:3]}")
    for key, spec in expected.items():
        tensor = tensors[key]
        if tuple(tensor.shape) != spec.shape or str(tensor.dtype).removeprefix("torch.") != spec.dtype:
            raise ArtifactError(
                f"tensor is {tensor.dtype!s} {list(tensor.shape)}, the manifest implies "
                f"{spec.dtype} {list(spec.shape)}",
                location=key,
            )


def plan_shards(tensors: dict[str, Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Keys grouped into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def _fsync(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def write_artifact(
    manifest: Manifest,
    tensors: dict[str, Tensor],
    path: Path,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Manifest:
    """Write ``manifest`` (its ``files`` are filled in here) and ``tensors`` as an artifact folder.

    The folder appears at ``path`` only once complete: everything is written to a sibling temp
    folder that is renamed into place, so a crash never leaves half an artifact.

    Returns:
        The manifest as written, with ``files`` holding every file's size and sha256.

    """
    extra = list(unknown_fields(manifest))
    if extra:
        raise ManifestError(f"refusing to write fields the spec does not define: {', '.join(extra)}")
    _check_tensors(manifest, tensors)
    if path.exists() and not overwrite:
        raise ArtifactError("already exists; pass `overwrite` to replace it", location=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        names = _write_tensors(tensors, tmp, max_shard_bytes, tensor_file_metadata(manifest.spec_version))
        files = {name: FileEntry(size=(tmp / name).stat().st_size, sha256=sha256_file(tmp / name)) for name in names}
        written = manifest.model_copy(update={"files": files})
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest_json(written), indent=2) + "\n")
        for name in [*names, MANIFEST_NAME]:
            _fsync(tmp / name)
        replace_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return written


def _unshared(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Copies of tensors that share memory with an earlier one (safetensors refuses shared storage)."""
    seen: set[int] = set()
    out = {}
    for key in sorted(tensors):
        tensor = tensors[key]
        pointer = tensor.untyped_storage().data_ptr() if tensor.numel() else -1
        out[key] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return out


def _write_tensors(
    tensors: dict[str, Tensor], folder: Path, max_shard_bytes: int, metadata: dict[str, str]
) -> list[str]:
    tensors = _unshared(tensors)
    shards = plan_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file({k: tensors[k] for k in shards[0]}, folder / SINGLE_FILE_NAME, metadata=metadata)
        return [SINGLE_FILE_NAME]
    names = [shard_name(i + 1, len(shards)) for i in range(len(shards))]
    for name, keys in zip(names, shards, strict=True):
        save_file({k: tensors[k] for k in keys}, folder / name, metadata=metadata)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {
        "metadata": {"total_size": total, **metadata},
        "weight_map": {key: name for name, keys in zip(names, shards, strict=True) for key in keys},
    }
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [*names, INDEX_NAME]


def replace_folder(staged: Path, target: Path) -> None:
    """Put the folder ``staged`` at ``target``, replacing whatever is there, all or nothing.

    A rename cannot replace a non-empty folder, so an old ``target`` (folder, file or link) is
    first renamed aside, then ``staged`` renamed into place, then the old one deleted; should the
    second rename fail, the old one is renamed back. Readers see the old folder or the new one,
    never a mix. ``staged`` must be on the same filesystem (a sibling of ``target``).

    Raises:
        OSError: a rename failed (``target`` is then as it was).

    """
    if not os.path.lexists(target):
        os.rename(staged, target)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    try:
        os.rename(staged, target)
    except BaseException:
        os.rename(old, target)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def tensor_dtype(name: str) -> torch.dtype:
    """The torch dtype of a spec dtype name (``float32`` …)."""
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}[
        name
    ]
