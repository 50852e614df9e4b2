"""Checking an artifact on a hub before downloading it: manifest, index and safetensors headers.

The manifest and the index are small and fetched whole; of each tensor file only the header is
read, by one range request (as ``huggingface_hub.parse_safetensors_file_metadata`` does). They are
laid out in a scratch folder as sparse files of the sizes the hub lists, so that the validator's
own rules judge them: names, sizes, index, headers, tensor shapes and dtypes. A file the hub
stores in LFS has its sha256 in the listing, which is compared with the manifest's; values are
left to ``pull``, which verifies everything before use.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from laplace_hub.artifact.files import DEFAULT_MAX_BYTES, parse_json
from laplace_hub.artifact.findings import Report
from laplace_hub.artifact.staging import folder_lock
from laplace_hub.errors import MissingExtraError
from laplace_hub.hub.download import Deadline, cache_folder
from laplace_hub.hub.locations import check_subfolder, endpoint_of, local_root, lock_path, repo_path
from laplace_hub.hub.pull import Download, resolve_commit
from laplace_hub.manifest import INDEX_NAME, MANIFEST_NAME
from laplace_hub.progress import phase
from laplace_hub.validate import validate


@dataclass
class RemoteReport(Report):
    """A validator's report of an artifact on a hub, and how far the check could see without downloading."""

    revision: str = ""
    bytes_read: int = 0
    checksums_confirmed: int = 0  # files whose sha256 the hub's listing or a whole download matched
    files: int = 0

    def reach(self) -> str:
        """One line on what the check read and could confirm."""
        return (
            f"checked from {self.bytes_read} bytes of commit {self.revision}; {self.checksums_confirmed} of "
            f"{self.files} file checksums confirmed by the hub; values are verified when you pull"
        )

    def to_json(self) -> dict[str, Any]:
        """The report as plain JSON data, with what was checked."""
        return super().to_json() | {
            "revision": self.revision,
            "bytes_read": self.bytes_read,
            "checksums_confirmed": self.checksums_confirmed,
            "files": self.files,
            "values_checked": False,
        }


def validate_remote(
    repo_id: str,
    *,
    revision: str | None = None,
    subfolder: str = "",
    hub: str | Path | None = None,
    token: str | bool | None = None,
    timeout: float | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Report:
    """Validate an artifact where it lies, downloading only its manifest, index and headers.

    On a local folder hub the folder is validated in place, values and checksums included.

    Raises:
        HubError: the repo, revision or artifact cannot be found or the server misbehaves.

    """
    sub = subfolder.strip("/")
    root = local_root(hub)
    if root is not None:
        folder = repo_path(root, repo_id, sub)
        with folder_lock(lock_path(folder), shared=True):
            return validate(folder, max_bytes=max_bytes)
    try:
        from huggingface_hub import HfApi, constants
    except ImportError as e:
        raise MissingExtraError("huggingface-hub", "hf") from e
    check_subfolder(sub)  # it becomes part of every URL
    endpoint = endpoint_of(hub)
    where = f"{repo_id}@{revision or 'main'}" + (f"/{sub}" if sub else "")
    deadline = Deadline(where, timeout)
    repo_dir = cache_folder(Path(constants.HF_HUB_CACHE), repo_id)
    sha = resolve_commit(HfApi(endpoint=endpoint, token=token), repo_id, revision, repo_dir, where, deadline)
    download = Download(repo_id, sha, sub, where, deadline, token, endpoint)
    with tempfile.TemporaryDirectory(prefix="laplace-hub-remote-") as scratch, phase(f"validate {where}: headers"):
        folder = Path(scratch)
        wanted, listing, _ = download.plan(folder)  # a manifest that does not parse: its files' headers still tell
        report = RemoteReport(where, revision=sha, files=len(wanted))
        report.bytes_read = (folder / MANIFEST_NAME).stat().st_size
        if sum(wanted.values()) > max_bytes:
            wanted = {}  # the validator reports file.budget and judges nothing else of the files
        for name, size in wanted.items():
            if name == INDEX_NAME:  # small (the spec bounds it): whole, and hashed here
                download.fetch(name, size, folder)
                report.bytes_read += size
                continue
            head = download.header(name, size)
            report.bytes_read += len(head)
            with (folder / name).open("xb") as f:
                f.write(head)
                f.truncate(listing[name].size if listing and name in listing else size)
        found = validate(folder, checksums=False, values=False, max_bytes=max_bytes)
        report.findings = found.findings
        if found.valid:
            _compare_checksums(report, folder, listing)
    return report


def _compare_checksums(report: RemoteReport, folder: Path, listing: dict[str, Any] | None) -> None:
    """The manifest's sha256 of each file against the hub's LFS id, or the bytes themselves for the index."""
    manifest = parse_json((folder / MANIFEST_NAME).read_bytes(), location=MANIFEST_NAME, code="manifest.json_invalid")
    for name, entry in manifest["files"].items():
        if name == INDEX_NAME:
            actual: str | None = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        else:
            actual = listing[name].sha256 if listing and name in listing else None
        if actual is None:
            continue
        if actual != entry["sha256"]:
            report.add("file.checksum", name, f"the hub holds sha256 {actual}; the manifest says {entry['sha256']}")
        else:
            report.checksums_confirmed += 1


__all__ = ["RemoteReport", "validate_remote"]
