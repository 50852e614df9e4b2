"""The curvature algebra: factors and blocks over torch tensors, no I/O."""

from laplace_hub.curvature.blocks import Block, BlockSum, DiagBlock, KronBlock, LoraPairBlock, WeightBlock
from laplace_hub.curvature.factors import DenseFactor, EigenFactor, Factor, pack_symmetric, unpack_symmetric

__all__ = [
    "Block",
    "BlockSum",
    "DenseFactor",
    "DiagBlock",
    "EigenFactor",
    "Factor",
    "KronBlock",
    "LoraPairBlock",
    "WeightBlock",
    "pack_symmetric",
    "unpack_symmetric",
]
