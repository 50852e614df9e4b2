"""Every exception laplace-hub raises, in one tree rooted at :class:`LaplaceHubError`.

Leaves also inherit the matching builtin so that ``except ValueError`` keeps working for callers
who do not know about us. Each error carries the place it refers to in ``location`` so that the
CLI can print one line that names what and where.
"""

from __future__ import annotations


class LaplaceHubError(Exception):
    """Root of all laplace-hub errors.

    Args:
        message: What went wrong and what to do about it, in one line.
        location: The file, tensor key, manifest path or module the error refers to.
        code: A stable finding code (SPEC.md §9) when the error breaks a rule of the spec.

    """

    code: str | None = None

    def __init__(self, message: str, *, location: str | None = None, code: str | None = None) -> None:
        self.message = message
        self.location = location
        self.code = code or type(self).code
        super().__init__(f"{location}: {message}" if location else message)


class ManifestError(LaplaceHubError, ValueError):
    """The manifest is not valid JSON or does not match the spec's models."""

    code = "manifest.schema"


class UnsupportedVersionError(ManifestError):
    """The artifact's spec major version is not one this reader implements."""

    def __init__(self, found: str, supported: str, *, location: str | None = None) -> None:
        self.found = found
        self.supported = supported
        super().__init__(
            f"spec version {found} is not supported by this reader (it reads {supported}); "
            "upgrade laplace-hub to read it",
            location=location,
            code="version.unsupported_major",
        )


class ArtifactError(LaplaceHubError, ValueError):
    """The artifact's files or tensors disagree with its manifest or with the spec."""

    code = "artifact.invalid"


class ArtifactNotFoundError(LaplaceHubError, FileNotFoundError):
    """No artifact exists where one was asked for."""

    code = "artifact.not_found"


class ChecksumError(ArtifactError):
    """A file's sha256 or size differs from the manifest's record."""

    code = "file.checksum"


class UnsafePathError(ArtifactError):
    """A path in a manifest or index would leave the artifact folder or is not a plain name."""

    code = "file.unsafe_path"


class StructureError(LaplaceHubError, ValueError):
    """A curvature operation was asked of blocks that do not support it (shape or kind)."""


class ModelMismatchError(LaplaceHubError, ValueError):
    """The model does not match the artifact (module names, shapes, fingerprint or LoRA init)."""


class MissingExtraError(LaplaceHubError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(
            f"this feature needs the package {package!r}; install it with `pip install 'laplace-hub[{extra}]'`"
        )


class DataError(LaplaceHubError, ValueError):
    """Source or target data cannot be read or holds no usable tokens."""


class HubError(LaplaceHubError, RuntimeError):
    """Pushing to or pulling from a hub failed."""


class ProvenanceError(LaplaceHubError, ValueError):
    """An adapter's record of the prior it was trained under cannot be read or written."""

    code = "provenance.invalid"


def error_for_code(code: str, message: str, location: str | None) -> LaplaceHubError:
    """The exception a reader raises for a finding: the most specific class its code names."""
    if code in ("artifact.not_found", "manifest.missing"):
        return ArtifactNotFoundError(message, location=location, code=code)
    classes: dict[str, type[LaplaceHubError]] = {
        "file.checksum": ChecksumError,
        "file.size": ChecksumError,
        "file.unsafe_path": UnsafePathError,
        "manifest": ManifestError,
        "version": ManifestError,
    }
    error_class = classes.get(code) or classes.get(code.split(".")[0], ArtifactError)
    return error_class(message, location=location, code=code)


__all__ = [
    "ArtifactError",
    "ArtifactNotFoundError",
    "ChecksumError",
    "DataError",
    "HubError",
    "LaplaceHubError",
    "ManifestError",
    "MissingExtraError",
    "ModelMismatchError",
    "ProvenanceError",
    "StructureError",
    "UnsafePathError",
    "UnsupportedVersionError",
    "error_for_code",
]
