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


def random_directions(name: str, size: int, shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> Tensor:
    """A Gaussian ``Ω`` of ``size`` directions, the same on every process (seeded by name and seed)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(size, *shape, generator=gen, dtype=torch.float64).to(dtype)


def nystrom(sketch: Tensor, test: Tensor, rank: int) -> Tensor:
    """The top-``rank`` directions ``U`` (``rank × …``) with ``Σⱼ vec(Uⱼ) vec(Uⱼ)ᵀ ≈ F``.

    Args:
        sketch: ``F Ω``, shaped like ``test`` (``s × …``: one slice per test direction).
        test: ``Ω``.
        rank: How many directions to keep (at most ``s``).

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
    eigenvalues = (singular.square() - shift).clamp_min(0)[:rank]
    factor = y.new_zeros(rank, y.shape[1])  # zero directions where F has fewer than `rank`
    factor[: eigenvalues.shape[0]] = (left[:, :rank] * eigenvalues.sqrt()).T
    return factor.reshape(rank, *test.shape[1:]).to(sketch.dtype)


def diag_lowrank_from_sketch(diagonal: Tensor, sketch: Tensor, test: Tensor, rank: int) -> DiagLowRankBlock:
    """``D + UUᵀ`` with ``U`` the top directions and ``D`` the rest of ``F``'s diagonal.

    Since ``UUᵀ ⪯ F``, ``D = diag(F) − diag(UUᵀ) ≥ 0``: the block matches ``F`` on the diagonal
    exactly and on the top-``rank`` eigenspace up to the sketch's accuracy.
    """
    lowrank = nystrom(sketch, test, rank)
    return DiagLowRankBlock((diagonal - lowrank.square().sum(0)).clamp_min(0), lowrank)
