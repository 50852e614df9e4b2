"""Writing an artifact folder atomically: shards, index, checksums, manifest, then one rename."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from laplace_hub.artifact.files import sha256_file, shard_name
from laplace_hub.artifact.staging import replace_folder, staging_folder
from laplace_hub.errors import ArtifactError, ManifestError
from laplace_hub.manifest import (
    INDEX_NAME,
    MANIFEST_NAME,
    SINGLE_FILE_NAME,
    FileEntry,
    Manifest,
    TensorSpec,
    expected_tensors,
    manifest_json,
    tensor_file_metadata,
    unknown_fields,
)

DEFAULT_MAX_SHARD_BYTES = 2 * 2**30


def _load(key: str, spec: TensorSpec, get: Callable[[str], Tensor]) -> Tensor:
    try:
        tensor = get(key)
    except KeyError:
        raise ArtifactError("tensor missing: the manifest references it, nothing holds it", location=key) from None
    if tuple(tensor.shape) != spec.shape or str(tensor.dtype).removeprefix("torch.") != spec.dtype:
        raise ArtifactError(
            f"tensor is {tensor.dtype!s} {list(tensor.shape)}, the manifest implies {spec.dtype} {list(spec.shape)}",
            location=key,
        )
    return tensor


def plan_shards(sizes: Mapping[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Keys (with their bytes) grouped into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key in sorted(sizes):
        if shards[-1] and size + sizes[key] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += sizes[key]
    return shards


def _fsync(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def write_artifact(
    manifest: Manifest,
    tensors: Callable[[str], Tensor],
    path: Path,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Manifest:
    """Write ``manifest`` (its ``files`` are filled in here) and its tensors as an artifact folder.

    ``tensors`` gives each key the manifest references; they are fetched one shard at a time and
    let go once the shard is written, so an artifact backed by files (opened, or spilled by a
    producer) is written with one shard in memory. The folder appears at ``path`` only once
    complete: everything is written to a sibling temp folder that is renamed into place, so a
    crash never leaves half an artifact.

    Returns:
        The manifest as written, with ``files`` holding every file's size and sha256.

    Raises:
        ArtifactError: A tensor is missing or differs in shape or dtype from what the manifest implies.

    """
    extra = list(unknown_fields(manifest))
    if extra:
        raise ManifestError(f"refusing to write fields the spec does not define: {', '.join(extra)}")
    if path.exists() and not overwrite:
        raise ArtifactError("already exists; pass `overwrite` to replace it", location=str(path))
    expected = expected_tensors(manifest)
    with staging_folder(path, "tmp") as tmp:
        names = _write_tensors(expected, tensors, tmp, max_shard_bytes, tensor_file_metadata(manifest.spec_version))
        files = {name: FileEntry(size=(tmp / name).stat().st_size, sha256=sha256_file(tmp / name)) for name in names}
        written = manifest.model_copy(update={"files": files})
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest_json(written), indent=2) + "\n")
        mode = (tmp / MANIFEST_NAME).stat().st_mode & 0o777  # what the umask gives a new file
        for name in [*names, MANIFEST_NAME]:
            (tmp / name).chmod(mode)  # safetensors writes 0600 files: others sharing the hub could not read them
            _fsync(tmp / name)
        replace_folder(tmp, path)
    return written


def _shard(keys: list[str], expected: Mapping[str, TensorSpec], get: Callable[[str], Tensor]) -> dict[str, Tensor]:
    """One shard's tensors, checked."""
    return distinct({key: _load(key, expected[key], get) for key in keys})


def distinct(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``tensors``, with a copy of any that shares memory with an earlier one (safetensors refuses shared memory)."""
    seen: set[int] = set()
    out = {}
    for key, tensor in tensors.items():
        pointer = tensor.untyped_storage().data_ptr() if tensor.numel() else -1
        out[key] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return out


def _write_tensors(
    expected: Mapping[str, TensorSpec],
    get: Callable[[str], Tensor],
    folder: Path,
    max_shard_bytes: int,
    metadata: dict[str, str],
) -> list[str]:
    sizes = {key: math.prod(spec.shape) * tensor_dtype(spec.dtype).itemsize for key, spec in expected.items()}
    shards = plan_shards(sizes, max_shard_bytes)
    if len(shards) == 1:
        save_file(_shard(shards[0], expected, get), folder / SINGLE_FILE_NAME, metadata=metadata)
        return [SINGLE_FILE_NAME]
    names = [shard_name(i + 1, len(shards)) for i in range(len(shards))]
    for name, keys in zip(names, shards, strict=True):
        save_file(_shard(keys, expected, get), folder / name, metadata=metadata)
    index = {
        "metadata": {"total_size": sum(sizes.values()), **metadata},
        "weight_map": {key: name for name, keys in zip(names, shards, strict=True) for key in keys},
    }
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [*names, INDEX_NAME]


def tensor_dtype(name: str) -> torch.dtype:
    """The torch dtype of a spec dtype name (``float32`` …)."""
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}[
        name
    ]
