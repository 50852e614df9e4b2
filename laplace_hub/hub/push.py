"""Publishing an artifact: validated first, then one commit (or one atomic rename on a local hub)."""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from laplace_hub.artifact import Artifact
from laplace_hub.artifact.files import is_file_name
from laplace_hub.artifact.staging import folder_lock, replace_folder, staging_folder
from laplace_hub.errors import HubError, MissingExtraError
from laplace_hub.hub.card import build_card
from laplace_hub.hub.locations import endpoint_of, local_root, lock_path, repo_path
from laplace_hub.manifest import CARD_NAME, MANIFEST_NAME
from laplace_hub.progress import note
from laplace_hub.validate import validate


@dataclass(frozen=True)
class PushResult:
    """Where the artifact landed."""

    commit_url: str
    commit_sha: str
    pr_url: str | None = None


def _checked(folder: Path) -> Artifact:
    report = validate(folder)
    if not report.valid:
        first = report.errors[0]
        raise HubError(
            f"refusing to push an invalid artifact ({len(report.errors)} error(s)); first: "
            f"[{first.code}] {first.location}: {first.message}",
            location=str(folder),
        )
    return Artifact.open(folder)


def _commit_message(artifact: Artifact) -> str:
    m = artifact.manifest
    structures = ", ".join(sorted({b.structure for module in m.modules.values() for b in module.blocks}))
    return f"Add laplace-hub curvature ({structures}, {m.parameterization.kind}-space) for {m.base_model.repo_id}"


def push(
    folder: str | Path,
    repo_id: str,
    *,
    hub: str | Path | None = None,
    path_in_repo: str = "",
    revision: str | None = None,
    create_pr: bool = False,
    create_repo: bool = False,
    private: bool = False,
    commit_message: str | None = None,
    token: str | bool | None = None,
) -> PushResult:
    """Validate an artifact folder and publish it, with a model card, as one commit.

    Args:
        folder: The artifact folder.
        repo_id: ``owner/name`` on the hub.
        hub: ``None`` for the Hugging Face Hub (``HF_ENDPOINT``), an ``http(s)://`` endpoint, or a
            local folder / ``file://`` URL.
        path_in_repo: Subfolder, e.g. ``laplace`` to live inside the base model's own repo.
        revision: Branch to commit to (default ``main``).
        create_pr: Open a pull request instead of committing to the branch.
        create_repo: Create the repo if it does not exist.
        private: Make a repo created here private.
        commit_message: Overrides the generated message.
        token: As ``huggingface_hub`` takes it; never printed.

    Raises:
        HubError: invalid artifact, missing repo, or a concurrent push moved the branch.

    """
    artifact = _checked(Path(folder))
    sub = path_in_repo.strip("/")
    card = build_card(artifact, repo_id, sub)
    message = commit_message or _commit_message(artifact)
    root = local_root(hub)
    if root is not None:
        if create_pr or revision not in (None, "main"):
            raise HubError("a local hub has no branches or pull requests; drop `revision` / `create_pr`")
        try:
            return _push_local(Path(folder), artifact, root, repo_id, sub, card, create_repo)
        except OSError as e:  # a full disk, permissions: one line, as pull says it
            raise HubError(f"push to {repo_id} failed: {e.strerror or e}", location=str(e.filename or root)) from e
    return _push_remote(
        Path(folder),
        artifact,
        repo_id,
        sub,
        card,
        message,
        endpoint_of(hub),
        revision,
        create_pr,
        create_repo,
        private,
        token,
    )


def _artifact_files(artifact: Artifact) -> list[str]:
    return [*artifact.manifest.files, MANIFEST_NAME]


def _push_local(
    folder: Path, artifact: Artifact, root: Path, repo_id: str, sub: str, card: str, create_repo: bool
) -> PushResult:
    target = repo_path(root, repo_id, sub)
    if not create_repo and not repo_path(root, repo_id).is_dir():
        raise HubError(f"no repo {repo_id} in the local hub {root}; pass `create_repo`", location=str(root))
    if not sub:
        _refuse_other_files(target, repo_id)
    parent = _content_id(target)  # the revision this push replaces, as create_commit's parent_commit
    with staging_folder(target, "push") as staging:
        for name in _artifact_files(artifact):
            shutil.copy2(folder / name, staging / name)
        (staging / CARD_NAME).write_text(card)
        sha = _content_id(staging)
        with folder_lock(lock_path(target)):
            if _content_id(target) != parent:
                where = f"{repo_id}/{sub}" if sub else repo_id
                raise HubError(
                    f"{where} moved while pushing (another writer pushed first); nothing was written, "
                    "pull and push again",
                    location=str(target),
                )
            replace_folder(staging, target)
    assert sha is not None
    return PushResult(commit_url=target.resolve().as_uri(), commit_sha=sha)


def _refuse_other_files(target: Path, repo_id: str) -> None:
    """A push at a local repo's root replaces that folder: refuse when it holds more than an artifact."""
    try:
        names = os.listdir(target)
    except FileNotFoundError:
        return
    others = sorted(
        n for n in names if not n.startswith(".") and n not in (MANIFEST_NAME, CARD_NAME) and not is_file_name(n)
    )
    if others:
        raise HubError(
            f"{repo_id} holds other files ({', '.join(others[:3])}); a push at its root would replace them: "
            "push with --path-in-repo (e.g. laplace)",
            location=str(target),
        )


def _content_id(folder: Path) -> str | None:
    """A local hub's revision of an artifact folder: the sha256 of its manifest (what a pull reports)."""
    try:
        fd = os.open(folder / MANIFEST_NAME, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _push_remote(
    folder: Path,
    artifact: Artifact,
    repo_id: str,
    sub: str,
    card: str,
    message: str,
    endpoint: str | None,
    revision: str | None,
    create_pr: bool,
    create_repo: bool,
    private: bool,
    token: str | bool | None,
) -> PushResult:
    try:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError as e:
        raise MissingExtraError("huggingface-hub", "hf") from e
    api = HfApi(endpoint=endpoint, token=token)
    prefix = f"{sub}/" if sub else ""
    operations: list[Any] = [
        CommitOperationAdd(f"{prefix}{name}", str(folder / name)) for name in _artifact_files(artifact)
    ]
    operations.append(CommitOperationAdd(f"{prefix}{CARD_NAME}", card.encode()))
    mib = artifact.manifest.file_bytes() / 2**20
    try:
        if create_repo:
            api.create_repo(repo_id, private=private, exist_ok=True)
        # The parent commit pins the push: if the branch moves meanwhile, the commit is refused
        # instead of interleaving with another writer's.
        head = api.repo_info(repo_id, revision=revision).sha
        # The commit replaces the artifact folder whole: files of an older artifact (other shards) go.
        new = {op.path_in_repo for op in operations}
        stale = [
            path
            for path in api.list_repo_files(repo_id, revision=head)
            if path.startswith(prefix) and is_file_name(path[len(prefix) :]) and path not in new  # not laplace_notes.md
        ]
        operations += [CommitOperationDelete(path) for path in stale]
        note(f"push {repo_id}: uploading {len(new)} file(s), {mib:.1f} MiB")
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=message,
            revision=revision,
            create_pr=create_pr,
            parent_commit=head,
            commit_description="Published with `laplace-hub push`; see README.md in this folder.",
        )
    except RepositoryNotFoundError as e:
        raise HubError(f"repo {repo_id} not found (or no access); pass `create_repo` to create it") from e
    except RevisionNotFoundError as e:
        raise HubError(f"branch {revision!r} not found in {repo_id}") from e
    except HfHubHTTPError as e:
        if e.response.status_code == 412:
            raise HubError(
                f"{repo_id}@{revision or 'main'} moved while pushing (another writer committed "
                f"first); nothing was written, pull and push again"
            ) from e
        raise HubError(f"push to {repo_id} failed: {str(e).splitlines()[0]}") from e
    return PushResult(commit_url=info.commit_url, commit_sha=info.oid, pr_url=info.pr_url)
