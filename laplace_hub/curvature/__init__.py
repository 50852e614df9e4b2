"""The curvature algebra: factors and blocks over torch tensors, no I/O."""

from laplace_hub.curvature.blocks import (
    Block,
    BlockSum,
    DiagBlock,
    DiagLowRankBlock,
    KronBlock,
    LoraPairBlock,
    WeightBlock,
)
from laplace_hub.curvature.factors import DenseFactor, EigenFactor, Factor, pack_symmetric, unpack_symmetric
from laplace_hub.curvature.stack import signature, stack_blocks

__all__ = [
    "Block",
    "BlockSum",
    "DenseFactor",
    "DiagBlock",
    "DiagLowRankBlock",
    "EigenFactor",
    "Factor",
    "KronBlock",
    "LoraPairBlock",
    "WeightBlock",
    "pack_symmetric",
    "signature",
    "stack_blocks",
    "unpack_symmetric",
]
