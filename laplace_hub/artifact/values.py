"""Rules of tensor values and what readers decode (SPEC.md §8.2–8.3): the penalty is the form of what is stored.

An accepted artifact's penalty is finite, never negative, and the quadratic form of its stored numbers:

* every stored value is finite and at most ``MAX_VALUE`` in magnitude (with dataset weights at most
  ``2**16``, a Kronecker penalty of a unit-sized update cannot overflow float32);
* diagonals and eigenvalues are ``≥ 0``; eigenvalues are non-increasing and ``≥ tail`` (up to the
  stored dtype's rounding, which readers clip), so ``V diag(λ − t) Vᵀ + t·I`` is PSD for any ``V``;
  eigenvectors are orthonormal up to the stored dtype's rounding;
* a dense factor ``F`` is symmetric and PSD up to its dtype's rounding: ``max|F − Fᵀ| ≤ τ·max|F|``
  and ``S + (τ/2)·‖S‖_F·I`` has a Cholesky factor, ``S`` the symmetric part. Readers decode ``S₊``,
  the PSD part of ``S`` (its negative eigenvalues, which rounding alone can cause, set to 0): the
  least change that makes the stored numbers PSD (:func:`psd_part`). No ridge: what is stored is
  what the penalty is;
* a ``kron_tridiag`` block is PSD as a whole: with its diagonal blocks ``Gₐ⊗Xₐ`` and ``G_b⊗X_b``
  positive definite, that holds iff ``‖Gₐ^{-½} R G_b^{-½}‖·‖Xₐ^{-½} L X_b^{-½}‖ ≤ 1`` (a Schur
  complement on Kronecker factors: no matrix larger than one factor is formed). Readers scale the
  cross block down to that bound when rounding puts it a hair above.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from laplace_hub.artifact.findings import Sink
from laplace_hub.curvature import pack_symmetric, unpack_symmetric
from laplace_hub.manifest import TensorSpec

MAX_VALUE = 2.0**40
# τ by stored dtype: twice the unit roundoff at least, so that rounding a PSD matrix stays within it.
TOLERANCE = {"float64": 1e-10, "float32": 1e-6, "float16": 2e-3, "bfloat16": 1.6e-2}
ORTHONORMAL_TOLERANCE = {"float64": 1e-8, "float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
_CHUNK = 2**22


def check_tensor(sink: Sink, key: str, tensor: Tensor, spec: TensorSpec) -> bool:
    """The rules of one stored tensor, read in chunks (no float64 copy of a whole diagonal or basis).

    Returns:
        Whether the tensor passed (a collecting sink keeps going after a finding).

    """
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        # One reduction per chunk in the stored dtype: NaN propagates into both ends, ±inf shows at one.
        low, high = (float(v) for v in flat[start : start + _CHUNK].aminmax())
        if not (math.isfinite(low) and math.isfinite(high)):
            sink.add("value.non_finite", key, "holds NaN or infinite values")
            return False
        if max(-low, high) > MAX_VALUE:
            sink.add("value.range", key, f"holds {max(-low, high):.3g}, above the limit of 2^40 in magnitude")
            return False
        if spec.role in ("diagonal", "eigenvalues") and low < 0:
            sink.add("value.negative", key, f"{spec.role} has negative entries (min {low:.3g})")
            return False
    if spec.role == "eigenvalues" and (tensor[1:].double() > tensor[:-1].double()).any():
        sink.add("value.eigen_order", key, "eigenvalues must be non-increasing (the top-k eigenpairs, largest first)")
        return False
    if spec.role == "eigenvectors":
        v = tensor.to(torch.float64)
        error = (v.T @ v - torch.eye(v.shape[1], dtype=torch.float64)).abs().max().item()
        if error > ORTHONORMAL_TOLERANCE[spec.dtype]:
            sink.add(
                "value.not_orthonormal",
                key,
                f"max |VᵀV − I| = {error:.3g} exceeds {ORTHONORMAL_TOLERANCE[spec.dtype]:g}",
            )
            return False
    return spec.role != "factor" or _check_factor(sink, key, tensor, spec)


def _check_factor(sink: Sink, key: str, tensor: Tensor, spec: TensorSpec) -> bool:
    matrix = _matrix(tensor.to(torch.float64))
    tol = TOLERANCE[spec.dtype]
    scale = matrix.abs().max().item()
    asym = (matrix - matrix.T).abs().max().item()
    if asym > tol * scale:
        sink.add("value.not_symmetric", key, f"max |F − Fᵀ| = {asym:.3g} exceeds {tol:g} × max|F|")
        return False
    if not psd_with_margin(matrix, tol / 2):
        sink.add("value.not_psd", key, f"indefinite: F + {tol / 2:g}·‖F‖_F·I has no Cholesky factor ({spec.dtype})")
        return False
    return True


def _matrix(tensor: Tensor) -> Tensor:
    if tensor.dim() == 2:
        return tensor
    n = int((math.isqrt(8 * tensor.shape[0] + 1) - 1) // 2)
    return unpack_symmetric(tensor, n)


def psd_with_margin(matrix: Tensor, margin: float) -> bool:
    """True when the symmetric part of ``matrix`` plus ``margin·‖·‖_F·I`` is positive definite (float64)."""
    wide = matrix.double()
    sym = wide + wide.T
    sym.mul_(0.5)
    ridge = margin * torch.linalg.matrix_norm(sym).item()
    if ridge == 0.0:
        return True  # the zero matrix
    sym.diagonal().add_(ridge)
    _, info = torch.linalg.cholesky_ex(sym)
    return int(info) == 0


def psd_part(matrix: Tensor) -> Tensor:
    """What readers use for a stored dense factor: ``S₊``, the PSD part of its symmetric part ``S``.

    ``S₊`` is the nearest PSD matrix to ``S`` (Frobenius and spectral norm): ``S`` with its negative
    eigenvalues set to 0, unchanged in every other direction. When ``S`` has a Cholesky factor in
    float64 it is PD and ``S₊ = S``, which costs one Cholesky (a third of the flops of a product)
    instead of an eigendecomposition (SPEC.md §8.3). Computed in float64, returned in the input's dtype.
    """
    wide = matrix.double()
    sym = (wide + wide.mT) * 0.5
    _, info = torch.linalg.cholesky_ex(sym)
    if int(info) == 0:
        return sym.to(matrix.dtype)
    values, vectors = torch.linalg.eigh(sym)
    return ((vectors * values.clamp_min(0)) @ vectors.mT).to(matrix.dtype)


def decoded_factor(tensor: Tensor) -> Tensor:
    """A stored factor (full or packed) as readers decode it (:func:`psd_part`), in its own layout.

    For a merge that widens a part's dtype: the wider copy holds exactly what readers of the narrow
    one used, so the part's penalty does not move.
    """
    matrix = psd_part(_matrix(tensor.to(torch.float64)))
    return matrix if tensor.dim() == 2 else pack_symmetric(matrix)


def psd_for_storage(matrix: Tensor, dtype: torch.dtype, name: str) -> Tensor:
    """``matrix`` cast to ``dtype``, replaced by its PSD part first when rounding took it beyond the PSD rule.

    Rounding a PSD matrix to a dtype stays within the rule (``τ ≥ 2u``), so the rounded numbers are
    stored as they are and readers' :func:`psd_part` removes what rounding made negative. Only a
    factor already indefinite before rounding (float32 accumulation of a near-singular sum) is
    mended here, by the least change: its own PSD part.
    """
    stored = matrix.to(dtype)
    if psd_with_margin(stored, TOLERANCE[name] / 2):
        return stored
    return psd_part(matrix.double()).to(dtype)


def check_tail(sink: Sink, where: str, eigenvalues: Tensor, tail: float, dtype: str) -> None:
    """Kept eigenvalues are at least the tail (the mean of the dropped ones), up to rounding.

    A reader that asked for a narrower dtype than the stored one (float32 from float64) sees that
    dtype's rounding too, so the wider of the two tolerances applies: it judges what was stored.
    """
    read = str(eigenvalues.dtype).removeprefix("torch.")
    smallest = eigenvalues.double().min().item()
    if smallest < tail * (1 - max(TOLERANCE[dtype], TOLERANCE.get(read, 0.0))):
        sink.add("value.eigen_order", where, f"eigenvalue {smallest:.6g} is below the tail {tail:.6g}")


def cross_tolerance(dtype: str) -> float:
    """How far above 1 rounding alone can put a stored ``kron_tridiag`` block's cross norm: ``max(10⁻³, τ)``.

    Six rounded tensors move it by a few unit roundoffs (bf16: 1.004 seen on a projected block).
    """
    return max(1e-3, TOLERANCE[dtype])


def check_cross(sink: Sink, where: str, norm: float, dtype: str) -> None:
    """A kron_tridiag block is PSD iff its cross norm is at most 1 (rounding above it is clipped)."""
    if norm > 1 + cross_tolerance(dtype):
        sink.add(
            "value.not_psd",
            where,
            f"the cross block is {norm:.4g}× what the diagonal blocks allow: the LoRA pair's precision is indefinite",
        )


def cross_norm(
    a_input: Tensor, a_output: Tensor, b_input: Tensor, b_output: Tensor, cross_input: Tensor, cross_output: Tensor
) -> float:
    """``‖Gₐ^{-½} R G_b^{-½}‖·‖Xₐ^{-½} L X_b^{-½}‖`` for decoded factors: the block is PSD iff it is ``≤ 1``."""

    def whitened(left: Tensor, middle: Tensor, right: Tensor) -> float:
        if not middle.any():
            return 0.0
        low_l, info_l = torch.linalg.cholesky_ex(left.double())
        low_r, info_r = torch.linalg.cholesky_ex(right.double())
        if int(info_l) or int(info_r):
            return math.inf
        m = torch.linalg.solve_triangular(low_l, middle.double(), upper=False)
        m = torch.linalg.solve_triangular(low_r, m.T, upper=False).T
        return float(torch.linalg.matrix_norm(m, ord=2)) if torch.isfinite(m).all() else math.inf

    return whitened(a_output, cross_output, b_output) * whitened(a_input, cross_input, b_input)
