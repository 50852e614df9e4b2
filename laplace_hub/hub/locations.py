"""Where a hub is: the Hugging Face Hub (or a compatible server), or a local folder."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse


def local_root(hub: str | Path | None) -> Path | None:
    """The folder of a local hub (``file://`` URL or path), or ``None`` for a Hub endpoint."""
    if hub is None:
        return None
    text = str(hub)
    if text.startswith("file://"):
        return Path(unquote(urlparse(text).path))
    if text.startswith(("http://", "https://")):
        return None
    return Path(text)


def endpoint_of(hub: str | Path | None) -> str | None:
    """The endpoint URL when ``hub`` names a server; ``None`` means huggingface_hub's own (HF_ENDPOINT)."""
    text = str(hub) if hub is not None else ""
    return text if text.startswith(("http://", "https://")) else None


def repo_path(root: Path, repo_id: str, subfolder: str = "") -> Path:
    """A repo's folder in a local hub, refusing ids and subfolders that would leave the root."""
    from laplace_hub.errors import HubError

    parts = [*repo_id.split("/"), *(p for p in subfolder.split("/") if p)]
    if len(repo_id.split("/")) != 2 or any(p in ("", ".", "..") or "\\" in p for p in parts):
        raise HubError(f"invalid repo id or subfolder {repo_id!r} / {subfolder!r} (expected owner/name)")
    return root.joinpath(*parts)


def check_subfolder(sub: str) -> None:
    """Refuse a Hub subfolder with a part that is empty, ``.``, ``..`` or holds a backslash (it goes into URLs)."""
    from laplace_hub.errors import HubError

    if sub and any(part in ("", ".", "..") or "\\" in part for part in sub.split("/")):
        raise HubError(f"invalid subfolder {sub!r}", location="subfolder")


def lock_path(folder: Path) -> Path:
    """The lock file of an artifact folder in a local hub: a sibling, so that a swap of the folder keeps it."""
    return folder.parent / f".{folder.name}.lock"
