"""Checks of tensor values: finite, non-negative diagonals, symmetric PSD factors."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from laplace_hub.curvature import unpack_symmetric
from laplace_hub.manifest import TensorSpec
from laplace_hub.validate.findings import Report

# Relative tolerances by stored dtype: |F - Fᵀ| <= tol·max|F| and λ_min >= -tol·λ_max.
TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2}
DENSE_EIGEN_LIMIT = 4096


def min_eigenvalue(matrix: Tensor, iterations: int = 64) -> float:
    """Smallest eigenvalue: exact up to ``DENSE_EIGEN_LIMIT``, else by shifted power iteration."""
    if matrix.shape[0] <= DENSE_EIGEN_LIMIT:
        return float(torch.linalg.eigvalsh(matrix)[0])
    shift = float(torch.linalg.matrix_norm(matrix))  # Frobenius >= spectral norm
    vector = torch.randn(matrix.shape[0], dtype=matrix.dtype, generator=torch.Generator().manual_seed(0))
    for _ in range(iterations):
        vector = shift * vector - matrix @ vector
        vector = vector / vector.norm()
    return float(vector @ matrix @ vector)


def check_values(report: Report, folder: Path, layout: dict[str, str], expected: dict[str, TensorSpec]) -> None:
    """Load every well-formed referenced tensor once and check its values."""
    bad = {f.location for f in report.errors}
    for key, spec in expected.items():
        if key not in layout or key in bad or layout[key] in bad:
            continue
        with safe_open(str(folder / layout[key]), framework="pt") as f:
            tensor = f.get_tensor(key).to(torch.float64)
        _check_tensor(report, key, tensor, spec)


def _check_tensor(report: Report, key: str, tensor: Tensor, spec: TensorSpec) -> None:
    if not torch.isfinite(tensor).all():
        report.add("value.non_finite", key, "holds NaN or infinite values")
        return
    if spec.role in ("diagonal", "eigenvalues") and (tensor < 0).any():
        report.add("value.negative", key, f"{spec.role} has negative entries (min {tensor.min().item():.3g})")
    if spec.role != "factor":
        return
    matrix = unpack_symmetric(tensor, _side(tensor)) if tensor.dim() == 1 else tensor
    tol = TOLERANCE[spec.dtype]
    scale = matrix.abs().max().item() or 1.0
    asym = (matrix - matrix.T).abs().max().item()
    if asym > tol * scale:
        report.add("value.not_symmetric", key, f"max |F - Fᵀ| = {asym:.3g} exceeds {tol:g} × max|F|")
        return
    lowest = min_eigenvalue(matrix)
    if lowest < -tol * scale * matrix.shape[0] ** 0.5:
        report.add("value.not_psd", key, f"smallest eigenvalue {lowest:.3g} is negative beyond tolerance")


def _side(packed: Tensor) -> int:
    return int(((8 * packed.shape[0] + 1) ** 0.5 - 1) / 2)
