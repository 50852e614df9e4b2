"""Fetching an artifact: pinned to a commit, only its files, verified before anyone sees it.

A pull that fails verification (checksum, spec version, missing artifact) removes what it
downloaded, from the Hugging Face cache or the local dir, so that no partial artifact remains.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from laplace_hub.artifact import Artifact
from laplace_hub.errors import HubError, LaplaceHubError, MissingExtraError
from laplace_hub.hub.locations import endpoint_of, local_root, repo_path
from laplace_hub.manifest import MANIFEST_NAME


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
) -> Artifact:
    """Download an artifact (only its files), verify checksums and spec version, and open it.

    Works offline (``HF_HUB_OFFLINE=1``) from the cache. The returned artifact's ``origin`` records
    the repo, the resolved commit sha and the subfolder.

    Raises:
        HubError: repo, revision or artifact not found, not cached while offline, or the download
            does not verify (then nothing is left behind).
        UnsupportedVersionError: the artifact's spec major version is not ours.

    """
    sub = subfolder.strip("/")
    root = local_root(hub)
    if root is not None:
        return _pull_local(root, repo_id, sub, revision, local_dir)
    return _pull_remote(repo_id, revision, sub, endpoint_of(hub), local_dir, cache_dir, token)


def _open_verified(folder: Path, where: str) -> Artifact:
    if not (folder / MANIFEST_NAME).is_file():
        raise HubError(f"no laplace-hub artifact at {where} (no {MANIFEST_NAME}); check the repo and --subfolder")
    try:
        return Artifact.open(folder, verify_checksums=True)
    except LaplaceHubError as e:
        e.location = f"{where}: {e.location}" if e.location else where
        e.args = (f"{e.location}: {e.message}",)
        raise


def _copy_into(source: Path, local_dir: Path) -> Path:
    """Copy a verified artifact into ``local_dir`` atomically (temp sibling, then rename)."""
    local_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = local_dir.parent / f".{local_dir.name}.pull-{uuid.uuid4().hex[:8]}"
    shutil.copytree(source, staging)
    if local_dir.exists():
        shutil.rmtree(local_dir)
    staging.rename(local_dir)
    return local_dir


def _pull_local(root: Path, repo_id: str, sub: str, revision: str | None, local_dir: str | Path | None) -> Artifact:
    if revision not in (None, "main"):
        raise HubError("a local hub has no revisions; drop @revision")
    source = repo_path(root, repo_id, sub)
    artifact = _open_verified(source, f"{repo_id}/{sub}" if sub else repo_id)
    if local_dir is not None:
        artifact = Artifact.open(_copy_into(source, Path(local_dir)))
    artifact.origin = Origin(repo_id, artifact.manifest.files[next(iter(artifact.manifest.files))].sha256, sub)
    return artifact


def _pull_remote(
    repo_id: str,
    revision: str | None,
    sub: str,
    endpoint: str | None,
    local_dir: str | Path | None,
    cache_dir: str | Path | None,
    token: str | bool | None,
) -> Artifact:
    try:
        from huggingface_hub import HfApi, snapshot_download
        from huggingface_hub.errors import (
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
            RevisionResolutionError,
        )
    except ImportError as e:
        raise MissingExtraError("huggingface-hub", "hf") from e
    api = HfApi(endpoint=endpoint, token=token)
    where = f"{repo_id}@{revision or 'main'}" + (f"/{sub}" if sub else "")
    staging = (
        None if local_dir is None else Path(local_dir).parent / f".{Path(local_dir).name}.pull-{uuid.uuid4().hex[:8]}"
    )
    try:
        sha = str(api.resolve_revision(repo_id, revision=revision, cache_dir=cache_dir).resolved)
        snapshot = Path(
            snapshot_download(
                repo_id,
                revision=sha,
                allow_patterns=[f"{sub}/laplace*" if sub else "laplace*"],
                cache_dir=cache_dir,
                local_dir=staging,
                token=token,
                endpoint=endpoint,
            )
        )
    except RepositoryNotFoundError as e:
        raise HubError(f"repo {repo_id} not found (or no access)") from e
    except RevisionNotFoundError as e:
        raise HubError(f"revision {revision!r} not found in {repo_id}") from e
    except (RevisionResolutionError, LocalEntryNotFoundError) as e:
        raise HubError(
            f"{where} is not in the cache and the hub cannot be reached (offline?); pull it once online"
        ) from e
    except HfHubHTTPError as e:
        raise HubError(f"pull of {where} failed: {str(e).splitlines()[0]}") from e
    folder = snapshot / sub if sub else snapshot
    try:
        artifact = _open_verified(folder, where)
        if local_dir is not None:
            assert staging is not None
            artifact = Artifact.open(_copy_into(folder, Path(local_dir)), verify_checksums=False)
    except BaseException:
        _discard(folder, snapshot if staging is not None else None)
        raise
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    artifact.origin = Origin(repo_id, sha, sub)
    return artifact


def _discard(folder: Path, staging: Path | None) -> None:
    """Remove a download that did not verify: its snapshot links and the blobs they point to."""
    if staging is not None:
        shutil.rmtree(staging, ignore_errors=True)
        return
    if not folder.is_dir():
        return
    for link in folder.glob("laplace*"):
        target = link.resolve()
        link.unlink(missing_ok=True)
        if target != link and target.is_file():
            target.unlink(missing_ok=True)
