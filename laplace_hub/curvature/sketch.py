"""The top eigen-directions of a Fisher ``F = Σₙ gₙ gₙᵀ`` from one streaming pass (Nyström sketch).

``F`` is far too large to form, but ``F Ω = Σₙ gₙ (gₙᵀ Ω)`` for a fixed random test matrix ``Ω``
accumulates example by example (and sums across processes). The Nyström approximation
``F̂ = (FΩ)(ΩᵀFΩ)⁺(FΩ)ᵀ`` is then a randomized SVD of the gradient matrix in a single pass, and is
exact once the sketch is wider than the number of examples (``rank F ≤ N``). Stabilised with a
small shift as in Tropp, Yurtsever, Udell & Cevher (2017), "Fixed-rank approximation of a positive
semidefinite matrix from streaming data".
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor

from laplace_hub.curvature.blocks import DiagLowRankBlock
from laplace_hub.curvature.factors import EigenFactor


def random_directions(name: str, size: int, shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> Tensor:
    """A Gaussian ``Ω`` of ``size`` directions, the same on every process (seeded by name and seed)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(size, *shape, generator=gen, dtype=torch.float64).to(dtype)


def nystrom_eigh(sketch: Tensor, test: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (non-increasing) and orthonormal eigenvectors (columns) of ``F̂ ≈ F``.

    Args:
        sketch: ``F Ω``, shaped like ``test`` (``s × …``: one slice per test direction).
        test: ``Ω``.

    Exact (to rounding) once ``Ω`` has full column rank, i.e. ``s ≥ rank F``. Computed in float64.

    """
    size = test.shape[0]
    y, omega = sketch.reshape(size, -1).double(), test.reshape(size, -1).double()
    shift = torch.finfo(torch.float64).eps * y.shape[1] ** 0.5 * float(torch.linalg.matrix_norm(y))
    y = y + shift * omega
    core = omega @ y.T
    values, vectors = torch.linalg.eigh((core + core.T) / 2)
    keep = values > values.max().clamp_min(0) * size * torch.finfo(torch.float64).eps
    root = (y.T @ vectors[:, keep]) / values[keep].sqrt()  # F̂_shifted = root rootᵀ
    left, singular, _ = torch.linalg.svd(root, full_matrices=False)
    return (singular.square() - shift).clamp_min(0), left


def nystrom(sketch: Tensor, test: Tensor, rank: int) -> Tensor:
    """The top-``rank`` directions ``U`` (``rank × …``) with ``Σⱼ vec(Uⱼ) vec(Uⱼ)ᵀ ≈ F``.

    Args:
        sketch: ``F Ω``, shaped like ``test`` (``s × …``: one slice per test direction).
        test: ``Ω``.
        rank: How many directions to keep (at most ``s``).

    """
    values, vectors = nystrom_eigh(sketch, test)
    eigenvalues = values[:rank]
    factor = vectors.new_zeros(rank, vectors.shape[0])  # zero directions where F has fewer than `rank`
    factor[: eigenvalues.shape[0]] = (vectors[:, :rank] * eigenvalues.sqrt()).T
    return factor.reshape(rank, *test.shape[1:]).to(sketch.dtype)


def eigen_factor_from_sketch(sketch: Tensor, test: Tensor, trace: Tensor | float, rank: int) -> EigenFactor:
    """A ``kron_eig`` factor from the sketch ``F Ω`` (``s × n``) and ``tr F``, never forming ``F``.

    The top ``rank`` Nyström eigenpairs are kept and the tail is the mean of the rest of the
    trace, as :meth:`DenseFactor.compress <laplace_hub.curvature.DenseFactor.compress>` defines
    it from the exact spectrum (capped at the smallest kept eigenvalue, which a narrow sketch can
    underestimate); the two agree once the sketch is at least ``n`` wide.
    """
    n = test.shape[-1]
    values, vectors = nystrom_eigh(sketch, test)
    keep = min(rank, n, values.shape[0])
    tail = max(float(trace) - float(values[:keep].sum()), 0.0) / (n - keep) if keep < n else 0.0
    # Nyström underestimates the top eigenvalues, so the rest of the trace can come out above the
    # smallest kept one; the exact tail never does, and a tail above λ_k is no eigen factor.
    tail = min(tail, float(values[keep - 1])) if keep else tail
    return EigenFactor(vectors[:, :keep].to(sketch.dtype), values[:keep].to(sketch.dtype), tail)


def diag_lowrank_from_sketch(diagonal: Tensor, sketch: Tensor, test: Tensor, rank: int) -> DiagLowRankBlock:
    """``D + UUᵀ`` with ``U`` the top directions and ``D`` the rest of ``F``'s diagonal.

    Since ``UUᵀ ⪯ F``, ``D = diag(F) − diag(UUᵀ) ≥ 0``: the block matches ``F`` on the diagonal
    exactly and on the top-``rank`` eigenspace up to the sketch's accuracy.
    """
    lowrank = nystrom(sketch, test, rank)
    return DiagLowRankBlock((diagonal - lowrank.square().sum(0)).clamp_min(0), lowrank)
