"""File-level rules of the format: allowed names, bounded reads, safetensors headers, checksums.

Everything here treats its input as hostile: sizes are checked before anything is allocated, and
only names of a fixed grammar are ever joined to the artifact folder.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from laplace_hub.errors import ArtifactError, UnsafePathError
from laplace_hub.manifest import INDEX_NAME, SINGLE_FILE_NAME

MAX_MANIFEST_BYTES = 64 * 2**20
MAX_INDEX_BYTES = 64 * 2**20
MAX_HEADER_BYTES = 100 * 2**20
SHARD_PATTERN = re.compile(r"^laplace-(\d{5})-of-(\d{5})\.safetensors$")
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def check_file_name(name: str, *, location: str) -> str:
    """Accept only the spec's file names, so that no path can leave the folder."""
    if name in (SINGLE_FILE_NAME, INDEX_NAME) or SHARD_PATTERN.match(name):
        return name
    raise UnsafePathError(
        f"file name {name!r} is not allowed (expected {SINGLE_FILE_NAME}, {INDEX_NAME} or "
        "laplace-NNNNN-of-NNNNN.safetensors)",
        location=location,
    )


def shard_name(index: int, total: int) -> str:
    """``laplace-00001-of-00003.safetensors`` for index 1 of 3 (1-based)."""
    return f"laplace-{index:05d}-of-{total:05d}.safetensors"


def read_json_bounded(path: Path, limit: int, *, code: str) -> Any:
    """Read a JSON file no larger than ``limit`` bytes; errors name the file and carry ``code``."""
    size = path.stat().st_size
    if size > limit:
        raise ArtifactError(f"file is {size} bytes, above the limit of {limit}", location=path.name, code=code)
    try:
        return json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"not valid JSON: {e}", location=path.name, code=code) from e


@dataclass(frozen=True)
class TensorHeader:
    """One entry of a safetensors header."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed and bounds-checked safetensors header."""

    tensors: dict[str, TensorHeader]
    metadata: dict[str, str]


def _header_error(path: Path, message: str) -> ArtifactError:
    return ArtifactError(message, location=path.name, code="file.bad_safetensors")


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Parse a safetensors header and check every offset against the real file size.

    Raises:
        ArtifactError: (code ``file.bad_safetensors``) the header is absurd, truncated,
            malformed, or describes tensors outside the file or of the wrong byte size.

    """
    file_size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _header_error(path, f"file is {file_size} bytes, too short for a safetensors header")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > min(MAX_HEADER_BYTES, file_size - 8):
            raise _header_error(
                path, f"header claims {header_size} bytes but the file has {file_size} (truncated or forged)"
            )
        raw = f.read(header_size)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _header_error(path, f"header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise _header_error(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _header_error(path, "__metadata__ must map strings to strings")
    data_size = file_size - 8 - header_size
    tensors = {key: _parse_entry(path, key, entry, data_size) for key, entry in header.items()}
    return SafetensorsHeader(tensors, metadata)


def _parse_entry(path: Path, key: str, entry: Any, data_size: int) -> TensorHeader:
    try:
        dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
    except (KeyError, TypeError, ValueError) as e:
        raise _header_error(path, f"tensor {key!r}: malformed header entry") from e
    if dtype not in DTYPE_SIZES:
        raise _header_error(path, f"tensor {key!r}: dtype {dtype!r} not allowed ({', '.join(DTYPE_SIZES)})")
    if not (isinstance(shape, list) and all(isinstance(d, int) and 0 <= d < 2**40 for d in shape)):
        raise _header_error(path, f"tensor {key!r}: bad shape {shape!r}")
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data_size):
        raise _header_error(path, f"tensor {key!r}: data offsets [{start}, {end}] outside the {data_size} data bytes")
    numel = 1
    for d in shape:
        numel *= d
    if numel * DTYPE_SIZES[dtype] != end - start:
        raise _header_error(path, f"tensor {key!r}: {end - start} bytes for shape {shape} of {dtype}")
    return TensorHeader(DTYPE_NAMES[dtype], tuple(shape), start, end)


def sha256_file(path: Path, chunk: int = 8 * 2**20) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
