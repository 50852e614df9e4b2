"""Findings: what the validator reports, each with a stable code (SPEC.md §9)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from laplace_hub.artifact.files import TensorHeader
from laplace_hub.errors import (
    ArtifactError,
    ChecksumError,
    LaplaceHubError,
    ManifestError,
    UnsafePathError,
    UnsupportedVersionError,
)
from laplace_hub.manifest import SPEC_VERSION, Manifest

SPEC_MAJOR = SPEC_VERSION.split(".")[0]
_ERROR_CLASSES: dict[str, type[LaplaceHubError]] = {
    "manifest": ManifestError,
    "file.checksum": ChecksumError,
    "file.unsafe_path": UnsafePathError,
}

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    """One problem: a stable ``code``, how bad it is, where it is and what to do."""

    code: str
    severity: Severity
    location: str
    message: str

    def line(self) -> str:
        """One human-readable line."""
        return f"{self.severity}[{self.code}] {self.location}: {self.message}"


@dataclass
class Report:
    """Everything the validator found, plus what it parsed on the way (for readers to reuse)."""

    path: str
    findings: list[Finding] = field(default_factory=list)
    manifest: Manifest | None = None
    layout: dict[str, str] = field(default_factory=dict)
    headers: dict[str, TensorHeader] = field(default_factory=dict)
    manifest_version: str | None = None

    @property
    def errors(self) -> list[Finding]:
        """Findings that make the artifact invalid."""
        return [f for f in self.findings if f.severity == "error"]

    @property
    def valid(self) -> bool:
        """True when no finding is an error."""
        return not self.errors

    def add(self, code: str, location: str, message: str, severity: Severity = "error") -> None:
        """Record a finding."""
        self.findings.append(Finding(code, severity, location, message))

    def add_error(self, error: LaplaceHubError, location: str) -> None:
        """Record a raised library error as a finding."""
        self.add(error.code or "artifact.invalid", error.location or location, error.message)

    def raise_first(self) -> None:
        """Raise the first error as an :class:`ArtifactError` (what readers do)."""
        if self.errors:
            first = self.errors[0]
            # no path in the hint: after a failed pull the folder validated here is already gone
            more = (
                f" (and {len(self.errors) - 1} more: `laplace-hub validate` lists all)" if len(self.errors) > 1 else ""
            )
            if first.code == "version.unsupported_major":
                raise UnsupportedVersionError(self.manifest_version or "?", f"{SPEC_MAJOR}.x", location=first.location)
            error_class = _ERROR_CLASSES.get(first.code) or _ERROR_CLASSES.get(first.code.split(".")[0], ArtifactError)
            raise error_class(first.message + more, location=first.location, code=first.code)

    def to_json(self) -> dict[str, Any]:
        """The report as plain JSON data."""
        return {"path": self.path, "valid": self.valid, "findings": [asdict(f) for f in self.findings]}
