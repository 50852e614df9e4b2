"""File-level rules of the format: allowed names, safe opens, bounded JSON, safetensors headers, checksums.

Everything here treats its input as hostile: no link is followed and no FIFO or device is opened,
sizes are checked before anything is allocated, JSON is bounded in depth and number size, and
only names of a fixed grammar are ever joined to the artifact folder. Every failure is an
:class:`ArtifactError` with a finding code, never a bare ``OSError`` or ``RecursionError``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from laplace_hub.errors import ArtifactError, UnsafePathError
from laplace_hub.manifest import INDEX_NAME, SINGLE_FILE_NAME

MAX_MANIFEST_BYTES = 64 * 2**20
MAX_INDEX_BYTES = 64 * 2**20
MAX_HEADER_BYTES = 100 * 2**20
MAX_JSON_DEPTH = 32
MAX_INT_DIGITS = 24
DEFAULT_MAX_BYTES = 256 * 2**30
SHARD_PATTERN = re.compile(r"^laplace-(\d{5})-of-(\d{5})\.safetensors$")
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_file_name(name: str, *, location: str) -> str:
    """Accept only the spec's file names, so that no path can leave the folder."""
    if is_file_name(name):
        return name
    raise UnsafePathError(
        f"file name {name!r} is not allowed (expected {SINGLE_FILE_NAME}, {INDEX_NAME} or "
        "laplace-NNNNN-of-NNNNN.safetensors)",
        location=location,
    )


def is_file_name(name: str) -> bool:
    """Whether ``name`` is one of the spec's file names (what :func:`check_file_name` accepts)."""
    return name in (SINGLE_FILE_NAME, INDEX_NAME) or SHARD_PATTERN.match(name) is not None


def shard_name(index: int, total: int) -> str:
    """``laplace-00001-of-00003.safetensors`` for index 1 of 3 (1-based)."""
    return f"laplace-{index:05d}-of-{total:05d}.safetensors"


def unreadable(path: Path, error: OSError) -> ArtifactError:
    """An OS error on an artifact file as a finding-coded error naming the file."""
    return ArtifactError(f"cannot be read: {error.strerror or error}", location=path.name, code="file.unreadable")


def hf_cache_blob(path: Path) -> Path | None:
    """The blob a Hugging Face cache pointer links to, or ``None`` if ``path`` is not one.

    In that cache ``<repo>/snapshots/<sha>/…/name`` is a link to ``<repo>/blobs/<etag>``: such a
    link is read through, any other is refused, so no link can lead outside the repo's blobs.
    """
    if not path.is_symlink():
        return None
    for snapshots in path.parents:
        if snapshots.name == "snapshots":
            blobs = snapshots.parent / "blobs"
            if blobs.is_symlink() or not blobs.is_dir():
                return None
            try:
                target = path.resolve()
            except (RuntimeError, OSError):  # a link loop: not a cache pointer
                return None
            return target if target.parent == blobs.resolve() else None
    return None


def regular_stat(path: Path) -> os.stat_result | None:
    """``lstat`` of ``path`` if it is a regular file (not a link); ``None`` if there is nothing there.

    Raises:
        ArtifactError: (``file.not_regular``) a link, folder, FIFO or device; (``file.unreadable``)
            the entry cannot be looked at.

    """
    try:
        info = os.lstat(path)
        blob = hf_cache_blob(path) if stat.S_ISLNK(info.st_mode) else None
        if blob is not None:
            info = os.lstat(blob)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise unreadable(path, e) from e
    if not stat.S_ISREG(info.st_mode):
        what = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a regular file"
        raise ArtifactError(
            f"is {what}; artifact files must be regular files", location=path.name, code="file.not_regular"
        )
    return info


def regular_size(path: Path) -> int | None:
    """The size of ``path`` if it is a regular file (not a link); ``None`` if there is nothing there."""
    info = regular_stat(path)
    return None if info is None else info.st_size


FileIdentity = tuple[int, int, int, int]
"""Device, inode, size and modification time: a file replaced or rewritten since gets another."""


def identity(info: os.stat_result) -> FileIdentity:
    """The identity of a file as :func:`regular_stat` saw it."""
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def check_unchanged(path: Path, seen: FileIdentity) -> None:
    """Refuse a file that is no longer the one checked earlier (a concurrent writer replaced it).

    Raises:
        ArtifactError: (``file.changed``) it was replaced, rewritten or removed.

    """
    info = regular_stat(path)
    if info is None or identity(info) != seen:
        raise ArtifactError(
            "changed on disk after it was checked (another process replaced or rewrote it); open the artifact again",
            location=path.name,
            code="file.changed",
        )


def open_regular(path: Path) -> BinaryIO:
    """Open a regular file for reading, never following a link nor blocking on a FIFO."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(hf_cache_blob(path) or path, flags)
    except OSError as e:
        regular_size(path)  # names a link or a FIFO precisely
        raise unreadable(path, e) from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ArtifactError("is not a regular file", location=path.name, code="file.not_regular")
    return os.fdopen(fd, "rb")


class _JSONLimit(ValueError):
    """Raised from inside the JSON parser's hooks; turned into a finding by :func:`parse_json`."""


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _JSONLimit(f"an integer of {len(text)} digits (at most {MAX_INT_DIGITS} allowed)")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _JSONLimit(f"the number {text[:20]} overflows a float64")
    return value


def _refuse_constant(text: str) -> Any:
    raise _JSONLimit(f"{text} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise _JSONLimit(f"key {duplicate[:64]!r} appears twice in one object")
    return out


def _check_tree(value: Any) -> None:
    """Depth and text rules on parsed JSON, iteratively (deep input must not recurse here either)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            if not node.isascii() and _SURROGATE.search(node):
                raise _JSONLimit("a string holds a lone UTF-16 surrogate (not Unicode text)")
            continue
        if not isinstance(node, dict | list):
            continue
        if depth > MAX_JSON_DEPTH:
            raise _JSONLimit(f"nesting deeper than {MAX_JSON_DEPTH} levels")
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children)


def parse_json(data: bytes, *, location: str, code: str) -> Any:
    """Parse JSON bytes as the spec allows: UTF-8, bounded depth and numbers, no duplicate keys.

    Raises:
        ArtifactError: carrying ``code``, naming ``location``.

    """
    try:
        value = json.loads(
            data.decode("utf-8"),
            parse_int=_bounded_int,
            parse_float=_finite_float,
            parse_constant=_refuse_constant,
            object_pairs_hook=_unique_keys,
        )
        _check_tree(value)
    except RecursionError:
        raise ArtifactError(
            f"not valid JSON: nesting deeper than {MAX_JSON_DEPTH} levels", location=location, code=code
        ) from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, _JSONLimit
        raise ArtifactError(f"not valid JSON: {str(e)[:200]}", location=location, code=code) from None
    return value


def read_json_bounded(path: Path, limit: int, *, code: str) -> Any:
    """Read a JSON file no larger than ``limit`` bytes; errors name the file and carry ``code``."""
    try:
        with open_regular(path) as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise unreadable(path, e) from e
    if len(data) > limit:
        raise ArtifactError(f"file is larger than the limit of {limit} bytes", location=path.name, code=code)
    return parse_json(data, location=path.name, code=code)


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
    """Parse a safetensors header and hold it to every rule of the safetensors loader.

    The data buffer must be covered exactly: tensors lie back to back from offset 0 to the end of
    the file, with no hole, overlap or trailing byte (what the Rust loader demands too, so that
    no header accepted here is refused when the tensors are read).

    Raises:
        ArtifactError: (code ``file.bad_safetensors``) the header is absurd, truncated, malformed,
            or its tensors do not tile the data exactly.

    """
    try:
        with open_regular(path) as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _header_error(path, f"file is {file_size} bytes, too short for a safetensors header")
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size > min(MAX_HEADER_BYTES, file_size - 8):
                raise _header_error(
                    path, f"header claims {header_size} bytes but the file has {file_size} (truncated or forged)"
                )
            raw = f.read(header_size)
    except OSError as e:
        raise unreadable(path, e) from e
    if not raw.startswith(b"{"):
        raise _header_error(path, "header is not a JSON object")
    try:
        header = parse_json(raw, location=path.name, code="file.bad_safetensors")
    except ArtifactError as e:
        raise _header_error(path, f"header {e.message}") from None
    if not isinstance(header, dict):
        raise _header_error(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _header_error(path, "__metadata__ must map strings to strings")
    data_size = file_size - 8 - header_size
    tensors = {key: _parse_entry(path, key, entry, data_size) for key, entry in header.items()}
    end = 0
    for key, entry in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if entry.start != end:
            what = "overlaps the tensor before it" if entry.start < end else f"leaves a hole at byte {end}"
            raise _header_error(path, f"tensor {key!r} {what}: tensors must lie back to back")
        end = entry.end
    if end != data_size:
        raise _header_error(path, f"tensors cover {end} of the {data_size} data bytes (trailing bytes)")
    return SafetensorsHeader(tensors, metadata)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_entry(path: Path, key: str, entry: Any, data_size: int) -> TensorHeader:
    if not (isinstance(entry, dict) and entry.keys() == {"dtype", "shape", "data_offsets"}):
        raise _header_error(path, f"tensor {key!r}: an entry holds exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not (isinstance(dtype, str) and dtype in DTYPE_SIZES):
        raise _header_error(path, f"tensor {key!r}: dtype {str(dtype)[:20]!r} not allowed ({', '.join(DTYPE_SIZES)})")
    if not (isinstance(shape, list) and len(shape) <= 8 and all(_is_int(d) and 0 <= d < 2**40 for d in shape)):
        raise _header_error(path, f"tensor {key!r}: bad shape {str(shape)[:40]}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise _header_error(path, f"tensor {key!r}: data_offsets must be two integers")
    start, end = offsets
    if not 0 <= start <= end <= data_size:
        raise _header_error(path, f"tensor {key!r}: data offsets [{start}, {end}] outside the {data_size} data bytes")
    if math.prod(shape) * DTYPE_SIZES[dtype] != end - start:
        raise _header_error(path, f"tensor {key!r}: {end - start} bytes for shape {shape} of {dtype}")
    return TensorHeader(DTYPE_NAMES[dtype], tuple(shape), start, end)


def sha256_file(path: Path, chunk: int = 8 * 2**20) -> str:
    """Hex sha256 of a regular file, streamed."""
    digest = hashlib.sha256()
    try:
        with open_regular(path) as f:
            while block := f.read(chunk):
                digest.update(block)
    except OSError as e:
        raise unreadable(path, e) from e
    return digest.hexdigest()
