"""Fetching files from a Hub endpoint without trusting it with a path, a size or the time.

A server chooses nothing that becomes a path here: file names come from the manifest's grammar
(SPEC.md §8.1), the commit it resolves a revision to must be 40 hex digits, and a file enters the
Hugging Face cache as a blob named by the sha256 *we* computed of bytes that were verified — never
by a server's ETag. Each download is capped at the size the manifest declares and must come from
the pinned commit; the pull as a whole has a deadline. A lying, broken or slow server therefore
ends in one :class:`HubError` (or :class:`ChecksumError`) line, never in a hang, a traceback or a
file outside the destination.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from laplace_hub.artifact.files import MAX_HEADER_BYTES
from laplace_hub.errors import ChecksumError, HubError

COMMIT = re.compile(r"[0-9a-f]{40}")
SHA256 = re.compile(r"[0-9a-f]{64}")
REF = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")
"""A branch, tag or PR ref as a cache ``refs/`` path may hold it."""
_CHUNK = 2**20
READ_TIMEOUT_S = 10.0  # a server silent for this long mid-file has stopped answering
MIN_RATE = 2**18  # bytes per second every pull may count on (256 KiB/s) ...
GRACE_S = 60.0  # ... after this much time for requests, redirects and the manifest
HEADER_GUESS = 2**16  # bytes a first range request for a safetensors header asks for


def check_commit(sha: str, where: str) -> str:
    """The commit a server resolved a revision to, refused unless it is 40 lowercase hex digits."""
    if not COMMIT.fullmatch(sha):
        raise HubError(f"the server resolved {where} to {sha[:60]!r}, not a 40-hex commit sha; refusing it")
    return sha


@dataclass
class Deadline:
    """The time a pull may take: a grace period plus its declared bytes at :data:`MIN_RATE`."""

    where: str
    seconds: float | None = None  # None: GRACE_S + bytes / MIN_RATE, grown by `expect`
    start: float = field(default_factory=time.monotonic)
    _budget: float = GRACE_S

    def expect(self, nbytes: int) -> None:
        """Allow for ``nbytes`` more (the files the manifest lists, once it is read)."""
        self._budget += nbytes / MIN_RATE

    def left(self) -> float:
        """Seconds left; raises :class:`HubError` once none are."""
        limit = self.seconds if self.seconds is not None else self._budget
        remaining = limit - (time.monotonic() - self.start)
        if remaining <= 0:
            raise HubError(
                f"pull of {self.where} took longer than {limit:.0f} s (the server is too slow or stalls; "
                "pass a larger `timeout` / --timeout)"
            )
        return remaining


@contextmanager
def _response(url: str, headers: dict[str, str], commit: str, deadline: Deadline, where: str) -> Iterator[Any]:
    """A streamed GET from the pinned commit, its transport failures as one :class:`HubError` line."""
    import httpx2 as httpx
    from huggingface_hub import get_session

    try:
        timeout = httpx.Timeout(min(READ_TIMEOUT_S, deadline.left()))
        with get_session().stream("GET", url, headers=headers, follow_redirects=True, timeout=timeout) as response:
            if response.status_code not in (200, 206):
                raise HubError(f"the server answered HTTP {response.status_code} for {where}")
            served = response.headers.get("x-repo-commit")
            if served is not None and served != commit:
                raise HubError(f"the server sent {where} from commit {served[:60]!r}, not the pinned {commit}")
            yield response
    except (HubError, ChecksumError):
        raise
    except httpx.TooManyRedirects as e:
        raise HubError(f"the server redirected {where} in a loop") from e
    except httpx.TimeoutException as e:
        raise HubError(f"the server stopped answering while sending {where} (no byte for {READ_TIMEOUT_S:g} s)") from e
    except httpx.HTTPError as e:
        raise HubError(f"the server broke off sending {where} ({type(e).__name__})") from e


def fetch(
    url: str, dest: Path, *, limit: int, commit: str, headers: dict[str, str], deadline: Deadline, name: str
) -> None:
    """GET ``url`` into the new file ``dest``: at most ``limit`` bytes, from ``commit``, before the deadline."""
    where = f"{deadline.where}: {name}"
    with _response(url, headers, commit, deadline, where) as response:
        if response.status_code != 200:
            raise HubError(f"the server answered HTTP {response.status_code} for {where}")
        length = response.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise ChecksumError(
                f"the server announces {length[:24]} bytes, the manifest at most {limit}; not downloaded",
                location=where,
                code="file.size",
            )
        with dest.open("xb") as out:
            for chunk in _chunks(response, limit, deadline, where):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())


def fetch_header(url: str, *, size: int, commit: str, headers: dict[str, str], deadline: Deadline, name: str) -> bytes:
    """The first bytes of a safetensors file: its 8-byte length and the JSON header, by range requests.

    As ``huggingface_hub.parse_safetensors_file_metadata`` reads it: a first range of
    :data:`HEADER_GUESS` bytes, and a second one for the rest of a longer header; bounded by the
    file's listed ``size`` and the spec's header limit. A server that ignores ``Range`` is cut off.
    """
    limit = min(size, 8 + MAX_HEADER_BYTES)
    data = _range(url, 0, min(limit, HEADER_GUESS), commit, headers, deadline, name)
    wanted = min(8 + int.from_bytes(data[:8], "little"), limit) if len(data) >= 8 else len(data)
    if wanted > len(data):
        data += _range(url, len(data), wanted - len(data), commit, headers, deadline, name)
    return data[:wanted]


def _range(
    url: str, start: int, length: int, commit: str, headers: dict[str, str], deadline: Deadline, name: str
) -> bytes:
    """``length`` bytes from ``start`` (fewer if the server sends fewer); a 200 answer is skipped to ``start``."""
    where = f"{deadline.where}: {name}"
    data = bytearray()
    wanted = {"Range": f"bytes={start}-{start + max(length, 1) - 1}"}
    with _response(url, headers | wanted, commit, deadline, where) as response:
        skip = start if response.status_code == 200 else 0
        for chunk in _chunks(response, None, deadline, where):
            data += chunk
            if len(data) >= skip + length:
                break
    return bytes(data[skip : skip + length])


def _chunks(response: Any, limit: int | None, deadline: Deadline, where: str) -> Iterator[bytes]:
    received = 0
    for chunk in response.iter_bytes():  # as it arrives: the deadline sees a drip
        received += len(chunk)
        if limit is not None and received > limit:
            message = f"the server sent more than the manifest's {limit} bytes"
            raise ChecksumError(message, location=where, code="file.size")
        deadline.left()
        yield chunk


@dataclass(frozen=True)
class Listed:
    """A file as the hub lists it."""

    size: int
    sha256: str | None  # the LFS object id: the sha256 of the file, where the hub stores it in LFS


def list_folder(
    endpoint: str, repo_id: str, sub: str, sha: str, token: str | bool | None, deadline: Deadline
) -> dict[str, Listed] | None:
    """The hub's listing of the artifact's folder (one page, within the deadline): file name → size, sha256.

    ``None`` when the hub cannot list it (the download and the verification then decide); a listing
    that pages further is used as far as its first page goes.
    """
    import httpx2 as httpx
    from huggingface_hub import get_session
    from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

    url = f"{endpoint.rstrip('/')}/api/models/{repo_id}/tree/{sha}" + (f"/{sub}" if sub else "")
    try:
        timeout = httpx.Timeout(min(READ_TIMEOUT_S, deadline.left()))
        response = get_session().get(url, headers=build_hf_headers(token=token), timeout=timeout)
        entries = response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, httpx.InvalidURL, ValueError):
        return None
    if not isinstance(entries, list):
        return None
    files: dict[str, Listed] = {}
    for entry in entries[:100_000]:
        if isinstance(entry, dict) and entry.get("type") == "file" and isinstance(entry.get("path"), str):
            lfs = entry["lfs"] if isinstance(entry.get("lfs"), dict) else {}
            size = lfs.get("size", entry.get("size"))
            oid = lfs.get("oid")
            if isinstance(size, int) and not isinstance(size, bool):
                sha256 = oid if isinstance(oid, str) and SHA256.fullmatch(oid) else None
                files[entry["path"].rsplit("/", 1)[-1]] = Listed(size, sha256)
    return files


def cache_folder(cache_dir: Path, repo_id: str) -> Path:
    """huggingface_hub's cache folder of a model repo."""
    return cache_dir / f"models--{repo_id.replace('/', '--')}"


def into_cache(staged: Path, repo_dir: Path, commit: str, sub: str, names: list[str], revision: str | None) -> Path:
    """Move verified files into the cache as huggingface_hub lays it out; returns the snapshot folder.

    Blobs are named by their sha256, snapshots link to them, and ``refs/<revision>`` records the
    commit a branch or tag resolved to, so that offline pulls and huggingface_hub find them.
    """
    snapshot = repo_dir / "snapshots" / commit / sub if sub else repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    # the manifest last: a snapshot whose manifest is there is complete (a kill before leaves it unused)
    for name in sorted(names, key=lambda n: n == "laplace.json"):
        blob = repo_dir / "blobs" / _sha256(staged / name)
        os.replace(staged / name, blob)  # verified bytes, even over a blob someone else left corrupt
        link, temporary = snapshot / name, snapshot / f".{name}.{os.getpid()}.link"
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(os.path.relpath(blob, snapshot))
        os.replace(temporary, link)  # two pulls at once: each replaces the link, neither finds it half-made
    ref = revision or "main"
    if not COMMIT.fullmatch(ref) and REF.fullmatch(ref) and ".." not in ref.split("/"):
        path = repo_dir / "refs" / ref
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(commit)
    return snapshot


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()
