"""Findings and the two sinks the rule runner reports them to (SPEC.md §9).

The rules of the spec run once, in :mod:`laplace_hub.artifact.reader`; what happens to a finding
depends on who asked. A reader (:meth:`Artifact.open`, :meth:`Artifact.block`) passes
:class:`FirstError`, which raises on the first error; the validator passes a :class:`Report`, which
collects every finding. So a reader can never accept what the validator refuses.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from laplace_hub.errors import LaplaceHubError, error_for_code

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


class Sink(Protocol):
    """Where the rules report: ``add`` a finding, or hand over a library error carrying a code."""

    def add(self, code: str, location: str, message: str, severity: Severity = "error") -> None: ...

    def error(self, error: LaplaceHubError, location: str) -> None: ...


class FirstError:
    """The reader's sink: the first error is raised (the library error itself, when there is one)."""

    def add(self, code: str, location: str, message: str, severity: Severity = "error") -> None:
        if severity == "warning":
            warnings.warn(f"{location}: {message}", stacklevel=3)
            return
        if code in ("artifact.not_found", "manifest.missing"):
            raise error_for_code(code, f"no laplace-hub artifact here ({message})", location)
        # no path in the hint: after a failed pull the folder read here is already gone
        raise error_for_code(code, f"{message} (`laplace-hub validate` lists every finding)", location)

    def error(self, error: LaplaceHubError, location: str) -> None:
        raise error


@dataclass
class Report:
    """The validator's sink: every finding, in the order the rules found them."""

    path: str
    findings: list[Finding] = field(default_factory=list)

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

    def error(self, error: LaplaceHubError, location: str) -> None:
        """Record a library error raised by a parser as a finding."""
        self.add(error.code or "artifact.invalid", error.location or location, error.message)

    def to_json(self) -> dict[str, Any]:
        """The report as plain JSON data."""
        return {"path": self.path, "valid": self.valid, "findings": [asdict(f) for f in self.findings]}
