"""The validator: every rule of the spec, checked on a folder, all findings reported.

The rules themselves live in :mod:`laplace_hub.artifact.reader`, which readers run too; the
validator only collects instead of raising, and can add a base model's shapes.

Example:
    >>> from laplace_hub.validate import validate
    >>> report = validate("spec/conformance/1.0/valid/weight-kron")
    >>> report.valid
    True

"""

from __future__ import annotations

from pathlib import Path

from laplace_hub.artifact.files import DEFAULT_MAX_BYTES
from laplace_hub.artifact.findings import Finding, Report
from laplace_hub.artifact.reader import read
from laplace_hub.manifest import ModuleEntry


def validate(
    path: str | Path,
    *,
    checksums: bool = True,
    values: bool = True,
    model_shapes: dict[str, tuple[int, int]] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Report:
    """Check an artifact folder against the spec.

    Args:
        path: The artifact folder.
        checksums: Hash every file and compare with the manifest.
        values: Load every tensor and check finiteness, range, signs, symmetry, PSD-ness,
            eigen-factor order and orthonormality, and kron_tridiag blocks as a whole.
        model_shapes: Linear module name → ``(d_out, d_in)`` of a base model to check against.
        max_bytes: Refuse (as ``file.budget``) an artifact declaring more bytes than this.

    Returns:
        A :class:`Report` with every finding; ``report.valid`` is False when any is an error.

    """
    folder = Path(path)
    report = Report(str(folder))
    reading = read(folder, report, checksums=checksums, values=values, max_bytes=max_bytes)
    if reading is not None and model_shapes is not None:
        _check_model(report, reading.manifest.modules, model_shapes)
    return report


def _check_model(report: Report, modules: dict[str, ModuleEntry], model_shapes: dict[str, tuple[int, int]]) -> None:
    for name, module in modules.items():
        if name not in model_shapes:
            report.add("model.module_missing", f"modules.{name}", "the base model has no linear module of this name")
        elif tuple(module.shape) != tuple(model_shapes[name]):
            report.add(
                "model.shape",
                f"modules.{name}",
                f"artifact says {list(module.shape)}, the model has {list(model_shapes[name])}",
            )


__all__ = ["Finding", "Report", "validate"]
