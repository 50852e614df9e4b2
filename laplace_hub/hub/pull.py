"""Fetching an artifact: pinned to a commit, only its files, verified before anyone sees it.

Verified means checksums, spec version and every tensor's values. What a pull places in
``local_dir`` is the bytes it verified: they are copied (local hub) or downloaded (Hub) into a
staging folder beside ``local_dir``, verified there, then renamed into place. Nothing is hashed,
copied or downloaded before the manifest's sizes are checked against the real (or listed) sizes
and against the bytes its tensors can need, so a forged 50 GiB file is refused without reading it.

A pull that fails leaves nothing behind (no staging folder, no partial ``local_dir``, no
unverified files in the Hugging Face cache) and raises a :class:`LaplaceHubError`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from laplace_hub.artifact import Artifact
from laplace_hub.artifact.files import (
    DTYPE_NAMES,
    DTYPE_SIZES,
    MAX_HEADER_BYTES,
    MAX_INDEX_BYTES,
    MAX_MANIFEST_BYTES,
    is_file_name,
    open_regular,
    parse_json,
    regular_size,
)
from laplace_hub.artifact.staging import folder_lock, replace_folder, staging_folder
from laplace_hub.errors import (
    ArtifactError,
    ChecksumError,
    HubError,
    LaplaceHubError,
    ManifestError,
    MissingExtraError,
)
from laplace_hub.hub.download import (
    COMMIT,
    READ_TIMEOUT_S,
    REF,
    Deadline,
    Listed,
    cache_folder,
    check_commit,
    fetch,
    fetch_header,
    into_cache,
    list_folder,
)
from laplace_hub.hub.locations import check_subfolder, endpoint_of, local_root, lock_path, repo_path
from laplace_hub.manifest import CARD_NAME, INDEX_NAME, MANIFEST_NAME, expected_tensors, parse_manifest
from laplace_hub.progress import note, phase

MAX_CARD_BYTES = 2**20
_CHUNK = 8 * 2**20
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# O_NONBLOCK: opening a FIFO planted under an artifact's name returns at once instead of hanging.
_FILE_FLAGS = os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | _CLOEXEC
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW | _CLOEXEC
PULL_RECORD = ".laplace-hub-pull.json"
"""What a pull into a ``local_dir`` wrote there: repo, revision, subfolder and the sha256 of its manifest.

Hidden, so readers and validators ignore it (SPEC.md §2). A later pull replaces the folder only
while this record still matches its manifest: a folder the user wrote, or changed, is theirs.
"""


@dataclass(frozen=True)
class Origin:
    """Where a pulled artifact came from, with the commit its revision resolved to."""

    repo_id: str
    revision: str
    subfolder: str


def split_repo_revision(text: str) -> tuple[str, str | None]:
    """``owner/name@rev`` → (``owner/name``, ``rev``)."""
    repo_id, _, revision = text.partition("@")
    return repo_id, revision or None


def pull(
    repo_id: str,
    *,
    revision: str | None = None,
    subfolder: str = "",
    hub: str | Path | None = None,
    local_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    overwrite: bool = False,
    timeout: float | None = None,
) -> Artifact:
    """Fetch an artifact (only its files), verify checksums, spec version and values, and open it.

    Works offline (``HF_HUB_OFFLINE=1``) from the cache. The returned artifact's ``origin`` records
    the repo, the revision and the subfolder. On the Hub the revision is the resolved commit sha.
    A local folder hub has no commits: its revision is the sha256 of the ``laplace.json`` bytes,
    a content id of the whole artifact since the manifest records every file's sha256.

    A local folder hub is read without following links below its root: a linked owner, repo or
    subfolder folder is refused, and only the manifest, the files it lists and a ``README.md``
    (a regular file of at most 1 MiB) are copied, never hidden or other entries. Without
    ``local_dir`` the hub's folder is opened in place, after the same link checks, and verified.

    Args:
        repo_id: ``owner/name``.
        revision: Branch, tag, PR ref or commit sha (Hub only).
        subfolder: The artifact's folder inside the repo.
        hub: ``None`` for the Hugging Face Hub (``HF_ENDPOINT``), an ``http(s)://`` endpoint, or a
            local folder / ``file://`` URL.
        local_dir: Put the verified files here instead of the Hugging Face cache.
        cache_dir: The Hugging Face cache to use.
        token: As ``huggingface_hub`` takes it; never printed.
        overwrite: Replace a ``local_dir`` that holds something other than an unchanged earlier
            pull (a link there is replaced itself, never what it points to).
        timeout: Seconds the whole pull from a Hub endpoint may take; by default a minute plus
            the declared bytes at 256 KiB/s.

    Raises:
        HubError: repo, revision or artifact not found, not cached while offline, a link or
            special file in a local hub, a ``local_dir`` holding other files, or an OS error.
        ArtifactError: the artifact does not verify (``ChecksumError``: a size or sha256;
            others: values, tensors, files); nothing is left behind.
        ManifestError: the manifest is invalid (``UnsupportedVersionError``: another major).

    """
    sub = subfolder.strip("/")
    target = None if local_dir is None else Path(local_dir)
    try:
        if target is not None:
            _check_target(target, overwrite)
        root = local_root(hub)
        if root is not None:
            return _pull_local(root, repo_id, sub, revision, target, overwrite)
        return _pull_remote(repo_id, revision, sub, endpoint_of(hub), target, cache_dir, token, timeout, overwrite)
    except LaplaceHubError:
        raise
    except (OSError, RecursionError) as e:  # shutil.Error, NotADirectoryError, … are OSErrors
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        where = getattr(e, "filename", None) or repo_id
        raise HubError(f"pull of {repo_id} failed: {reason}", location=str(where)) from e


def _check_target(target: Path, overwrite: bool) -> None:
    """Refuse to replace a ``local_dir`` that is not empty and not an unchanged earlier pull, unless told to."""
    if overwrite:
        return
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        reason = "is a symbolic link"
    elif not stat.S_ISDIR(info.st_mode):
        reason = "is a file, not a folder"
    else:
        names = sorted(os.listdir(target))
        if not names or _pulled_here(target, names):
            return
        what = "an artifact" if MANIFEST_NAME in names else ", ".join(repr(n) for n in names[:3])
        reason = f"holds {what} that no pull wrote (or that changed since)"
    raise HubError(
        f"local_dir {reason}; refusing to replace it (pass --overwrite / overwrite=True, or pick another folder)",
        location=str(target),
    )


def _pulled_here(target: Path, names: list[str]) -> bool:
    """Whether ``target`` holds exactly what an earlier pull wrote: its record, matching every file."""
    allowed = {PULL_RECORD, MANIFEST_NAME, CARD_NAME}
    if PULL_RECORD not in names or any(n not in allowed and not is_file_name(n) for n in names):
        return False
    try:
        with (target / PULL_RECORD).open("rb") as f:
            record = parse_json(f.read(MAX_CARD_BYTES), location=PULL_RECORD, code="hub.pull_record")
        with (target / MANIFEST_NAME).open("rb") as f:
            manifest = f.read(MAX_MANIFEST_BYTES)
    except (OSError, LaplaceHubError):
        return False
    return (
        isinstance(record, dict)
        and record.get("manifest_sha256") == hashlib.sha256(manifest).hexdigest()
        and record.get("files") == _file_stamps(target)
    )


def _file_stamps(folder: Path) -> dict[str, list[int]]:
    """Size and modification time of every file a pull wrote (a swap by rename keeps both)."""
    stamps = {}
    for name in sorted(os.listdir(folder)):
        if name != PULL_RECORD:
            info = os.lstat(folder / name)
            stamps[name] = [info.st_size, info.st_mtime_ns]
    return stamps


def _at(where: str, name: str) -> str:
    return f"{where}: {name}"


def _open_verified(folder: Path, where: str) -> Artifact:
    """Open ``folder`` checking every checksum and every tensor's values; errors name ``where``."""
    try:
        with phase(f"verifying {where} (checksums and values)"):
            return Artifact.open(folder, verify_checksums=True, check_values=True)
    except LaplaceHubError as e:
        e.location = f"{where}: {e.location}" if e.location else where
        e.args = (f"{e.location}: {e.message}",)
        raise


def listed_files(raw: bytes) -> dict[str, int]:
    """The manifest's ``files`` (name → declared size), read leniently: only well-formed entries.

    This decides what to copy, nothing more; verification reports whatever is malformed.
    """
    try:
        data = parse_json(raw, location=MANIFEST_NAME, code="manifest.json_invalid")
    except LaplaceHubError:
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        return {}
    listed: dict[str, int] = {}
    for name, entry in files.items():
        size = entry.get("size") if isinstance(entry, dict) else None
        if is_file_name(name) and isinstance(size, int) and not isinstance(size, bool) and size >= 0:
            listed[name] = size
    return listed


def within_budget(raw: bytes, where: str) -> bool:
    """Refuse files larger in all than the tensors the manifest declares can need, before reading any.

    Each tensor file holds only referenced tensors plus a bounded header, so the declared sizes
    cannot exceed the tensors' bytes plus one header per file and the index.

    Returns:
        False when the manifest does not parse: then nothing but it is fetched, and verification
        names the problem.

    """
    try:
        data = parse_json(raw, location=MANIFEST_NAME, code="manifest.json_invalid")
        if not isinstance(data, dict):
            return False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a newer minor's unknown fields: the open warns once
            manifest = parse_manifest(data)
        specs = expected_tensors(manifest)
    except (LaplaceHubError, ValueError, TypeError, RecursionError):
        return False
    width = {DTYPE_NAMES[k]: v for k, v in DTYPE_SIZES.items()}
    tensor_bytes = sum(width.get(s.dtype, 8) * math.prod(s.shape) for s in specs.values())
    tensor_files = [name for name in manifest.files if name != INDEX_NAME]
    if len(tensor_files) > max(1, len(specs)):  # every tensor file is a shard holding a tensor (SPEC.md §2)
        raise ArtifactError(
            f"the manifest lists {len(tensor_files)} tensor files for {len(specs)} tensors; refusing to fetch them",
            location=_at(where, "files"),
            code="index.inconsistent",
        )
    index_bytes = MAX_INDEX_BYTES if INDEX_NAME in manifest.files else 0
    budget = tensor_bytes + len(tensor_files) * (8 + MAX_HEADER_BYTES) + index_bytes
    declared = manifest.file_bytes()
    if declared > budget:
        raise ArtifactError(
            f"the manifest declares {declared} bytes of files, more than its tensors can need ({budget}); "
            "refusing to hash or copy them",
            location=_at(where, "files"),
            code="file.size",
        )
    return True


# --- a local folder hub ---------------------------------------------------------------------------


def _pull_local(
    root: Path, repo_id: str, sub: str, revision: str | None, target: Path | None, overwrite: bool
) -> Artifact:
    if revision not in (None, "main"):
        raise HubError("a local hub has no revisions; drop @revision")
    source = repo_path(root, repo_id, sub)
    where = f"{repo_id}/{sub}" if sub else repo_id
    # shared with other readers, exclusive of a push's swap: one artifact is read, old or new
    with folder_lock(lock_path(source), shared=True):
        return _pull_local_locked(root, source, repo_id, sub, where, target, overwrite)


def _pull_local_locked(
    root: Path, source: Path, repo_id: str, sub: str, where: str, target: Path | None, overwrite: bool
) -> Artifact:
    folder = _open_folder(root, source.relative_to(root).parts, where)
    try:
        raw = _read_manifest(folder, where, source)
        listed = listed_files(raw)
        fits = within_budget(raw, where)
        origin = Origin(repo_id, hashlib.sha256(raw).hexdigest(), sub)
        if target is None:
            for name, size in listed.items():
                _check_in_place(folder, name, size, where)
            walked, named = os.fstat(folder), os.stat(source)
            if (walked.st_dev, walked.st_ino) != (named.st_dev, named.st_ino):  # a link swapped in since the walk
                raise HubError("changed while it was being opened; pull again", location=str(source))
            artifact = _open_verified(source, where)
        else:
            artifact = _staged(
                target,
                where,
                origin,
                lambda staging: _copy_local(folder, raw, listed if fits else {}, staging, where),
                overwrite,
            )
    finally:
        os.close(folder)
    artifact.origin = origin
    return artifact


def _open_folder(root: Path, parts: tuple[str, ...], where: str) -> int:
    """Walk from the hub's root to the artifact folder one component at a time, following no link.

    Each step opens the next folder relative to the previous one with ``O_NOFOLLOW``, so no
    component can be swapped for a link between the check and the use.

    Returns:
        A file descriptor of the artifact folder (the caller closes it).

    """
    try:
        fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC)
    except OSError as e:
        raise HubError(f"the local hub is not a readable folder ({e.strerror})", location=str(root)) from e
    path = root
    try:
        for part in parts:
            path = path / part
            try:
                info = os.stat(part, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                raise HubError(
                    f"no laplace-hub artifact at {where} ({path} does not exist); check the repo and `subfolder`",
                    location=str(path),
                ) from None
            if stat.S_ISLNK(info.st_mode):
                raise HubError(
                    "is a symbolic link; a local hub is read without following links (put the folder itself there)",
                    location=str(path),
                )
            if not stat.S_ISDIR(info.st_mode):
                raise HubError(f"is not a folder; no laplace-hub artifact at {where}", location=str(path))
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:  # swapped for a link meanwhile (ELOOP), or no permission
                raise HubError(f"cannot be opened as a folder ({e.strerror})", location=str(path)) from e
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    return "a device or socket" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode) else "not a file"


def _open_file(folder: int, name: str, where: str, *, strict: bool = True) -> int | None:
    """Open ``name`` in ``folder`` for reading if it is a regular file; ``None`` when absent.

    Raises:
        HubError: (``strict`` only; otherwise ``None``) a link, FIFO, device, folder or unreadable.

    """
    try:
        info = os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return None
    mode = info.st_mode
    if stat.S_ISREG(mode):
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=folder)
        except OSError as e:
            if not strict:
                return None
            raise HubError(f"cannot be read ({e.strerror})", location=_at(where, name)) from e
        mode = os.fstat(fd).st_mode  # the entry may have been swapped since the stat
        if stat.S_ISREG(mode):
            return fd
        os.close(fd)
    if not strict:
        return None
    raise HubError(f"is {_kind(mode)}; a pull copies regular files only", location=_at(where, name))


def _read_manifest(folder: int, where: str, source: Path) -> bytes:
    fd = _open_file(folder, MANIFEST_NAME, where)
    if fd is None:
        raise HubError(
            f"no laplace-hub artifact at {where} (no {MANIFEST_NAME}); check the repo and `subfolder`",
            location=str(source),
        )
    with os.fdopen(fd, "rb") as f:
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(
            f"file is larger than the limit of {MAX_MANIFEST_BYTES} bytes",
            location=_at(where, MANIFEST_NAME),
            code="manifest.json_invalid",
        )
    return raw


def _check_in_place(folder: int, name: str, size: int, where: str) -> None:
    """A listed file opened in place: a regular file (not a link) of the declared size, else refused."""
    try:
        info = os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return  # verification names it
    if not stat.S_ISREG(info.st_mode):
        raise HubError(f"is {_kind(info.st_mode)}; a pull reads regular files only", location=_at(where, name))
    if info.st_size != size:
        raise ChecksumError(
            f"is {info.st_size} bytes, the manifest says {size}", location=_at(where, name), code="file.size"
        )


def _copy_local(folder: int, raw: bytes, listed: dict[str, int], staging: Path, where: str) -> None:
    """Copy the manifest (the bytes already read), the listed files and a small regular card."""
    _write(staging / MANIFEST_NAME, raw)
    for name, size in listed.items():
        fd = _open_file(folder, name, where)
        if fd is not None:  # a missing file: verification names it
            _copy_exact(fd, size, staging / name, _at(where, name))
    card = _open_file(folder, CARD_NAME, where, strict=False)
    if card is not None:
        with os.fdopen(card, "rb") as f:
            text = f.read(MAX_CARD_BYTES + 1)
        if len(text) <= MAX_CARD_BYTES:
            _write(staging / CARD_NAME, text)


def _copy_exact(fd: int, size: int, dest: Path, location: str) -> None:
    """Copy an open file in chunks, refusing it before reading a byte if its size is not ``size``."""
    with os.fdopen(fd, "rb") as src:
        real = os.fstat(src.fileno()).st_size
        if real != size:
            raise ChecksumError(f"is {real} bytes, the manifest says {size}", location=location, code="file.size")
        with dest.open("xb") as out:
            left = size + 1  # one byte more than declared: a file that grows meanwhile is caught
            while block := src.read(min(_CHUNK, left)):
                left -= len(block)
                if left == 0:
                    raise ChecksumError("grew while being copied", location=location, code="file.size")
                out.write(block)
            out.flush()
            os.fsync(out.fileno())


def _write(path: Path, data: bytes) -> None:
    with path.open("xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _staged(target: Path, where: str, origin: Origin, fill: Callable[[Path], None], overwrite: bool) -> Artifact:
    """Fill a staging folder beside ``target``, verify it, record the pull, swap it in; or leave nothing.

    The artifact returned is the one verified: its files stay mapped, so it reads the verified
    bytes whatever later happens to ``target``.
    """
    created = _make_parents(target.parent)
    try:
        with staging_folder(target, "pull") as staging:
            fill(staging)
            artifact = _open_verified(staging, where)
            manifest_sha256 = hashlib.sha256((staging / MANIFEST_NAME).read_bytes()).hexdigest()
            record = {**vars(origin), "manifest_sha256": manifest_sha256, "files": _file_stamps(staging)}
            _write(staging / PULL_RECORD, (json.dumps(record, indent=2) + "\n").encode())
            _check_target(target, overwrite)  # again: something may have appeared there while this pull ran
            replace_folder(staging, target)
    except BaseException:
        _remove_empty(created)
        raise
    artifact.path = target
    return artifact


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns those created, outermost first."""
    missing = [p for p in (folder, *folder.parents) if not os.path.lexists(p)][::-1]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(created: list[Path]) -> None:
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            return


# --- the Hugging Face Hub or a compatible server ------------------------------------------------


@contextmanager
def hub_errors(repo_id: str, revision: str | None, where: str) -> Iterator[None]:
    """huggingface_hub's errors as one-line :class:`HubError` s."""
    import httpx2
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        RevisionResolutionError,
    )

    try:
        yield
    except RepositoryNotFoundError as e:
        raise HubError(f"repo {repo_id} not found (or no access)") from e
    except HFValidationError as e:
        raise HubError(f"invalid repo id or revision: {str(e).splitlines()[0]}") from e
    except RevisionNotFoundError as e:
        raise HubError(f"revision {revision!r} not found in {repo_id}") from e
    except (RevisionResolutionError, LocalEntryNotFoundError) as e:
        raise HubError(
            f"{where} is not in the cache and the hub cannot be reached (offline?); pull it once online"
        ) from e
    except HfHubHTTPError as e:
        raise HubError(f"pull of {where} failed: {str(e).splitlines()[0]}") from e
    except (httpx2.HTTPError, httpx2.InvalidURL) as e:  # a redirect loop, a broken or silent connection, a bad URL
        raise HubError(f"pull of {where} failed: the server broke off ({type(e).__name__})") from e


def _pull_remote(
    repo_id: str,
    revision: str | None,
    sub: str,
    endpoint: str | None,
    target: Path | None,
    cache_dir: str | Path | None,
    token: str | bool | None,
    timeout: float | None,
    overwrite: bool,
) -> Artifact:
    try:
        from huggingface_hub import HfApi, constants
    except ImportError as e:
        raise MissingExtraError("huggingface-hub", "hf") from e
    api = HfApi(endpoint=endpoint, token=token)
    where = f"{repo_id}@{revision or 'main'}" + (f"/{sub}" if sub else "")
    check_subfolder(sub)
    repo_dir = cache_folder(Path(cache_dir or constants.HF_HUB_CACHE), repo_id)
    deadline = Deadline(where, timeout)  # every request of the pull, the first included
    sha = resolve_commit(api, repo_id, revision, repo_dir, where, deadline)
    origin = Origin(repo_id, sha, sub)
    cached = repo_dir / "snapshots" / sha / sub if sub else repo_dir / "snapshots" / sha
    in_cache = _complete(cached)
    if constants.HF_HUB_OFFLINE and not in_cache:
        raise HubError(f"{where} is not in the cache and the hub cannot be reached (offline?); pull it once online")
    if in_cache:  # a cache hit is verified like a download (and copied out of the cache for local_dir)
        if target is None and _holds_only_the_artifact(cached):
            artifact = _open_verified(cached, where)
        elif target is None:  # a repo's root whose model files are cached too: verify the artifact's alone
            with staging_folder(repo_dir / "download", "pull") as staging:
                _copy_cached(cached, staging, where)
                artifact = _open_verified(staging, where)  # its files stay mapped after the copy goes
            artifact.path = cached
        else:
            artifact = _staged(target, where, origin, lambda staging: _copy_cached(cached, staging, where), overwrite)
    else:
        download = Download(repo_id, sha, sub, where, deadline, token, endpoint)
        if target is not None:
            artifact = _staged(target, where, origin, download.into, overwrite)
        else:
            created = _make_parents(repo_dir)
            try:
                with staging_folder(repo_dir / "download", "pull") as staging:
                    download.into(staging)
                    artifact = _open_verified(staging, where)  # nothing enters the cache unverified
                    artifact.path = into_cache(staging, repo_dir, sha, sub, sorted(os.listdir(staging)), revision)
            except BaseException:
                _remove_empty(created)  # a cache folder made for this pull alone goes with it
                raise
    artifact.origin = origin
    return artifact


def _copy_cached(snapshot: Path, staging: Path, where: str) -> None:
    """Copy the manifest and the files it lists out of the Hugging Face cache (its links lead to blobs)."""
    with open_regular(snapshot / MANIFEST_NAME) as f:
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    _write(staging / MANIFEST_NAME, raw)
    for name, size in listed_files(raw).items():
        if regular_size(snapshot / name) is not None:  # a missing file: verification names it
            with open_regular(snapshot / name) as f:
                _copy_exact(os.dup(f.fileno()), size, staging / name, _at(where, name))


def _complete(snapshot: Path) -> bool:
    """Whether a cached snapshot holds the manifest and every file it lists (a kill may have cut it short)."""
    try:
        with open_regular(snapshot / MANIFEST_NAME) as f:
            listed = listed_files(f.read(MAX_MANIFEST_BYTES + 1))
        return all(regular_size(snapshot / name) is not None for name in listed)
    except (LaplaceHubError, OSError):
        return False


def _holds_only_the_artifact(snapshot: Path) -> bool:
    with open_regular(snapshot / MANIFEST_NAME) as f:
        listed = listed_files(f.read(MAX_MANIFEST_BYTES + 1))
    known = {MANIFEST_NAME, CARD_NAME, *listed}
    return all(name in known or name.startswith(".") for name in os.listdir(snapshot))


def resolve_commit(api: Any, repo_id: str, revision: str | None, repo_dir: Path, where: str, deadline: Deadline) -> str:
    """The commit ``revision`` names: asked of the hub, else (offline, unreachable) from the cache's refs.

    Only a 40-hex answer is used, and nothing is written to the cache here: a ref is recorded once
    the files it leads to verified (``into_cache``).
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    if not constants.HF_HUB_OFFLINE:
        import httpx2

        with hub_errors(repo_id, revision, where):
            try:
                info = api.repo_info(repo_id, revision=revision, timeout=min(READ_TIMEOUT_S, deadline.left()))
                return check_commit(str(info.sha), where)
            except (httpx2.TransportError, OfflineModeIsEnabled):
                pass  # unreachable: the cache's refs decide
    ref = revision or "main"
    if COMMIT.fullmatch(ref):
        return ref
    path = repo_dir / "refs" / ref
    if REF.fullmatch(ref) and ".." not in ref.split("/") and path.is_file():
        return check_commit(path.read_text().strip()[:64], where)
    raise HubError(f"{where} is not in the cache and the hub cannot be reached (offline?); pull it once online")


@dataclass
class Download:
    """The manifest first, its budget and sizes checked, then exactly the files it lists."""

    repo_id: str
    sha: str
    sub: str
    where: str
    deadline: Deadline
    token: str | bool | None
    endpoint: str | None

    def into(self, staging: Path) -> None:
        """Download the artifact's files into ``staging`` (flat: the subfolder's files only)."""
        wanted, _, fits = self.plan(staging)
        if wanted and fits:
            total = sum(wanted.values())
            self.deadline.expect(total)
            note(f"pull {self.where}: downloading {len(wanted)} file(s), {total / 2**20:.1f} MiB, then verifying them")
            for name, size in wanted.items():
                self.fetch(name, size, staging)

    def plan(self, staging: Path) -> tuple[dict[str, int], dict[str, Listed] | None, bool]:
        """Fetch the manifest into ``staging``; what the manifest lists and the hub has (name → size), and more.

        Also returns the hub's listing and whether the manifest parses with sizes that fit its
        tensors (else a pull fetches nothing more). A size the hub lists otherwise than the
        manifest is refused here, before any download; a listed file the hub lacks is left to
        verification to name.
        """
        listing = _remote_listing(self.endpoint, self.repo_id, self.sub, self.sha, self.token, self.deadline)
        if listing is not None and MANIFEST_NAME not in listing:
            raise HubError(
                f"no laplace-hub artifact at {self.where} (no {MANIFEST_NAME}); check the repo and `subfolder`",
                code="manifest.missing",
            )
        self.fetch(MANIFEST_NAME, MAX_MANIFEST_BYTES, staging)
        raw = (staging / MANIFEST_NAME).read_bytes()
        listed = listed_files(raw)
        fits = within_budget(raw, self.where)
        for name, size in listed.items():
            on_hub = None if listing is None or name not in listing else listing[name].size
            if on_hub is not None and on_hub != size:
                raise ChecksumError(
                    f"is {on_hub} bytes on the hub, the manifest says {size}; not downloaded",
                    location=_at(self.where, name),
                    code="file.size",
                )
        return {name: size for name, size in listed.items() if listing is None or name in listing}, listing, fits

    def fetch(self, name: str, limit: int, staging: Path) -> None:
        """Download one file of the artifact's folder into ``staging``, at most ``limit`` bytes."""
        fetch(self._url(name), staging / name, **self._request(name), limit=limit)

    def header(self, name: str, size: int) -> bytes:
        """The safetensors header of one tensor file of ``size`` bytes, by a range request."""
        return fetch_header(self._url(name), **self._request(name), size=size)

    def _url(self, name: str) -> str:
        from huggingface_hub import hf_hub_url

        path = f"{self.sub}/{name}" if self.sub else name
        return hf_hub_url(self.repo_id, path, revision=self.sha, endpoint=self.endpoint)

    def _request(self, name: str) -> dict[str, Any]:
        from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

        headers = build_hf_headers(token=self.token)
        return {"commit": self.sha, "headers": headers, "deadline": self.deadline, "name": name}


def _remote_listing(
    endpoint: str | None, repo_id: str, sub: str, sha: str, token: str | bool | None, deadline: Deadline
) -> dict[str, Listed] | None:
    """Sizes of the files directly in the artifact's folder as the hub lists them; ``None`` if unknown.

    An early check only, so that a forged size is refused before anything is downloaded; offline
    or when the listing fails, the download and the verification decide.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None
    return list_folder(endpoint or constants.ENDPOINT, repo_id, sub, sha, token, deadline)
