"""Stacking blocks of one signature into one block with a leading batch dimension.

A model has tens to hundreds of adapted modules but only a few shapes; evaluating each shape's
modules as one stacked block turns hundreds of small kernels (and autograd nodes) into a handful,
which is what makes the penalty cheap next to a training step. Shared factors (one ``Σx`` for
q/k/v) are copied into each stack: memory for speed.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from laplace_hub.curvature.blocks import Block, BlockSum, DiagBlock, DiagLowRankBlock, KronBlock, LoraPairBlock
from laplace_hub.curvature.factors import DenseFactor, EigenFactor, Factor
from laplace_hub.errors import StructureError


def _factor_signature(factor: Factor) -> Hashable:
    if isinstance(factor, EigenFactor):
        return ("eig", factor.dim, int(factor.eigenvalues.shape[-1]))
    return ("dense", factor.dim)


def signature(block: Block) -> Hashable:
    """Blocks with equal signatures stack; others (e.g. sums) get a signature of their own."""
    if isinstance(block, DiagBlock):
        return ("diag", block.shape)
    if isinstance(block, DiagLowRankBlock):
        return ("diag_lowrank", block.shape, block.rank)
    if isinstance(block, KronBlock):
        return ("kron", _factor_signature(block.input), _factor_signature(block.output))
    if isinstance(block, LoraPairBlock):
        return ("pair", signature(block.a), signature(block.b), block.cross_input is not None)
    if isinstance(block, BlockSum):  # e.g. a merged posterior: one term per task
        return ("sum", *(signature(term) for term in block.terms))
    return ("single", id(block))


def _stack_factors(factors: Sequence[Factor]) -> Factor:
    if all(isinstance(f, EigenFactor) for f in factors):
        eig = [f for f in factors if isinstance(f, EigenFactor)]
        tails = torch.tensor([float(f.tail) for f in eig], dtype=eig[0].eigenvalues.dtype)
        return EigenFactor(
            torch.stack([f.eigenvectors for f in eig]),
            torch.stack([f.eigenvalues for f in eig]),
            tails.to(eig[0].eigenvalues.device),
        )
    return DenseFactor(torch.stack([f.dense() for f in factors]))


def stack_blocks(blocks: Sequence[Block]) -> Block:
    """One block whose ``quad`` on stacked deltas is the sum of the blocks' ``quad``s.

    Raises:
        StructureError: the blocks do not share one signature.

    """
    if len({signature(b) for b in blocks}) != 1:
        raise StructureError("only blocks of one structure and shape can be stacked")
    first = blocks[0]
    if len(blocks) == 1:
        return first
    if isinstance(first, DiagBlock):
        return DiagBlock(torch.stack([b.diagonal for b in blocks]))  # type: ignore[attr-defined]
    if isinstance(first, DiagLowRankBlock):
        return DiagLowRankBlock(
            torch.stack([b.diagonal for b in blocks]),  # type: ignore[attr-defined]
            torch.stack([b.lowrank for b in blocks]),  # type: ignore[attr-defined]
        )
    if isinstance(first, BlockSum):
        sums = [b for b in blocks if isinstance(b, BlockSum)]
        return BlockSum(tuple(stack_blocks(terms) for terms in zip(*(s.terms for s in sums), strict=True)))
    if isinstance(first, KronBlock):
        return KronBlock(
            _stack_factors([b.input for b in blocks]),  # type: ignore[attr-defined]
            _stack_factors([b.output for b in blocks]),  # type: ignore[attr-defined]
        )
    if isinstance(first, LoraPairBlock):
        pairs = [b for b in blocks if isinstance(b, LoraPairBlock)]
        cross = first.cross_input is not None
        return LoraPairBlock(
            stack_blocks([p.a for p in pairs]),  # type: ignore[arg-type]
            stack_blocks([p.b for p in pairs]),  # type: ignore[arg-type]
            torch.stack([p.cross_input for p in pairs]) if cross else None,  # type: ignore[misc]
            torch.stack([p.cross_output for p in pairs]) if cross else None,  # type: ignore[misc]
        )
    raise StructureError(f"cannot stack a {type(first).__name__}")
