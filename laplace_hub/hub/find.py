"""Finding artifacts for a base model: repos tagged ``laplace-hub`` that name it, and its own repo."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from laplace_hub.errors import HubError, MissingExtraError
from laplace_hub.hub.locations import endpoint_of, local_root
from laplace_hub.manifest import MANIFEST_NAME, LoraParameterization, parse_manifest


@dataclass(frozen=True)
class FoundArtifact:
    """One artifact on a hub."""

    repo_id: str
    subfolder: str
    structures: list[Any]
    parameterization: str
    total_bytes: int
    last_modified: str | None

    def to_json(self) -> dict[str, Any]:
        """As JSON data."""
        return asdict(self)


def _from_manifest(raw: dict[str, Any], repo_id: str, subfolder: str, modified: str | None) -> FoundArtifact:
    m = parse_manifest(raw)
    structures = sorted({b.structure for module in m.modules.values() for b in module.blocks})
    kind = "lora" if isinstance(m.parameterization, LoraParameterization) else "weight"
    return FoundArtifact(repo_id, subfolder, structures, kind, m.file_bytes(), modified)


def find(base_model: str, *, hub: str | Path | None = None, token: str | bool | None = None) -> list[FoundArtifact]:
    """Artifacts whose base model is ``base_model``.

    On a Hub: repos whose card has ``library_name: laplace-hub`` / tag ``laplace-hub`` and
    ``base_model: <id>``, plus artifacts inside the base model's own repo (e.g. ``laplace/``).
    On a local hub: every artifact folder whose manifest names that base model.
    """
    root = local_root(hub)
    if root is not None:
        return _find_local(root, base_model)
    return _find_remote(base_model, endpoint_of(hub), token)


def _find_local(root: Path, base_model: str) -> list[FoundArtifact]:
    found = []
    for manifest in sorted(root.glob("*/*/**/" + MANIFEST_NAME)):
        relative = manifest.parent.relative_to(root).parts
        raw = json.loads(manifest.read_text())
        if raw.get("base_model", {}).get("repo_id") != base_model:
            continue
        modified = dt.datetime.fromtimestamp(manifest.stat().st_mtime, dt.timezone.utc).isoformat()
        found.append(_from_manifest(raw, "/".join(relative[:2]), "/".join(relative[2:]), modified))
    return found


def _find_remote(base_model: str, endpoint: str | None, token: str | bool | None) -> list[FoundArtifact]:
    try:
        from huggingface_hub import HfApi, hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
    except ImportError as e:
        raise MissingExtraError("huggingface-hub", "hf") from e
    api = HfApi(endpoint=endpoint, token=token)
    found: list[FoundArtifact] = []
    try:
        candidates = [m.id for m in api.list_models(filter=["laplace-hub", f"base_model:{base_model}"])]
        candidates.append(base_model)
        for repo_id in dict.fromkeys(candidates):
            try:
                info = api.repo_info(repo_id)
            except RepositoryNotFoundError:
                continue
            modified = info.last_modified.isoformat() if info.last_modified else None
            siblings = getattr(info, "siblings", None) or []
            for path in sorted(s.rfilename for s in siblings if s.rfilename.endswith(MANIFEST_NAME)):
                local = hf_hub_download(repo_id, path, revision=info.sha, endpoint=endpoint, token=token)
                raw = json.loads(Path(local).read_text())
                if raw.get("base_model", {}).get("repo_id") == base_model:
                    found.append(_from_manifest(raw, repo_id, path.removesuffix(MANIFEST_NAME).strip("/"), modified))
    except HfHubHTTPError as e:
        raise HubError(f"searching the hub failed: {str(e).splitlines()[0]}") from e
    return found
