"""The validator: every rule of the spec, checked on a folder, all findings reported.

Example:
    >>> from laplace_hub.validate import validate
    >>> report = validate("spec/conformance/1.0/valid/weight-kron")
    >>> report.valid
    True

"""

from __future__ import annotations

from pathlib import Path

from laplace_hub.artifact.files import MAX_MANIFEST_BYTES, read_json_bounded
from laplace_hub.errors import LaplaceHubError
from laplace_hub.manifest import MANIFEST_NAME, ModuleEntry, expected_tensors
from laplace_hub.validate.file_checks import check_files, check_tensors, read_layout
from laplace_hub.validate.findings import Finding, Report
from laplace_hub.validate.manifest_checks import check_semantics, parse_into
from laplace_hub.validate.value_checks import check_values


def validate(
    path: str | Path,
    *,
    checksums: bool = True,
    values: bool = True,
    model_shapes: dict[str, tuple[int, int]] | None = None,
) -> Report:
    """Check an artifact folder against the spec.

    Args:
        path: The artifact folder.
        checksums: Hash every file and compare with the manifest.
        values: Load every tensor and check finiteness, signs, symmetry and PSD-ness.
        model_shapes: Linear module name → ``(d_out, d_in)`` of a base model to check against.

    Returns:
        A :class:`Report` with every finding; ``report.valid`` is False when any is an error.

    """
    folder = Path(path)
    report = Report(str(folder))
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is a file, not an artifact folder"
        report.add("artifact.not_found", str(folder), f"{what}; an artifact is a folder holding {MANIFEST_NAME}")
        return report
    if not (folder / MANIFEST_NAME).is_file():
        report.add("manifest.missing", MANIFEST_NAME, "no manifest: this folder is not a laplace-hub artifact")
        return report
    try:
        raw = read_json_bounded(folder / MANIFEST_NAME, MAX_MANIFEST_BYTES, code="manifest.json_invalid")
    except LaplaceHubError as e:
        report.add_error(e, MANIFEST_NAME)
        return report
    manifest = report.manifest = parse_into(report, raw)
    if manifest is None:
        return report
    check_semantics(report, manifest)
    try:
        expected = expected_tensors(manifest)
    except LaplaceHubError as e:
        report.add("manifest.tensor_conflict", e.location or "modules", e.message)
        return report
    usable = check_files(report, folder, manifest, checksums)
    report.layout = read_layout(report, folder, manifest, usable)
    check_tensors(report, report.layout, expected)
    if values:
        check_values(report, folder, report.layout, expected)
    if model_shapes is not None:
        _check_model(report, manifest.modules, model_shapes)
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
