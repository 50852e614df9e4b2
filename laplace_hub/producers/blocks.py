"""Sums to blocks: divide the accumulator's sums by the counts (SPEC.md §6) and make one block per module."""

from __future__ import annotations

from collections.abc import Mapping

from laplace_hub.curvature import Block, DenseFactor, DiagBlock, Factor, KronBlock, LoraPairBlock, WeightBlock
from laplace_hub.curvature.sketch import diag_lowrank_from_sketch, eigen_factor_from_sketch
from laplace_hub.producers.accumulate import Covariance, LoraInit, ModuleSums, ParameterSums, SketchSums
from laplace_hub.producers.options import ComputeOptions, CurvatureOptions


def diagonal_block(sums: ParameterSums, scale: float, options: CurvatureOptions) -> WeightBlock:
    """The diag or diag_lowrank block of one parameter from its sums."""
    diagonal = sums.diagonal * scale
    if options.structure == "diag":
        return DiagBlock(diagonal)
    assert sums.sketch is not None and sums.directions is not None, "diag_lowrank sums carry a sketch"
    return diag_lowrank_from_sketch(diagonal, sums.sketch * scale, sums.directions, options.lowrank_rank)


def make_blocks(
    sums: Mapping[str, ModuleSums],
    sequences: int,
    tokens: int,
    options: ComputeOptions,
    inits: Mapping[str, LoraInit],
) -> dict[str, Block]:
    """Normalise the sums (SPEC.md §6) and make one block per module.

    Args:
        sums: The accumulator's result, summed over ranks.
        sequences: Sequences that carried a label, over all ranks.
        tokens: Labelled tokens, over all ranks.
        options: What was computed (and the dtype LoRA projections run in).
        inits: LoRA inits by module; empty for weight-space curvature.

    """
    per_unit = sequences if options.normalization == "per_sequence" else tokens
    out_scale = 1.0 / (per_unit * options.draws)
    in_scale = 1.0 / (sequences if options.kfac_approx == "reduce" else tokens)
    inputs: dict[str, Factor] = {}
    blocks: dict[str, Block] = {}
    for name, module in sums.items():
        if options.diagonal:
            params = {param: diagonal_block(part, out_scale, options) for param, part in module.parameters.items()}
            blocks[name] = LoraPairBlock(params["lora_A"], params["lora_B"]) if name in inits else params["weight"]
            continue
        owner = module.input_owner
        if owner not in inputs:
            inputs[owner] = _factor(sums[owner].input, in_scale, options.eig_rank)
        kron = KronBlock(inputs[owner], _factor(module.output, out_scale, options.eig_rank))
        if name in inits:
            init = inits[name]
            a, b = init.a.to(options.compute_dtype), init.b.to(options.compute_dtype)
            blocks[name] = kron.project_lora(a, b, init.scaling, cross=options.structure == "kron_tridiag")
        else:
            blocks[name] = kron
    return blocks


def _factor(summed: Covariance | None, scale: float, rank: int | None) -> Factor:
    """A normalised Kronecker factor: dense, eigen-truncated to ``rank``, or from its sketch."""
    assert summed is not None, "kron sums carry both covariances"
    if isinstance(summed, SketchSums):
        assert rank is not None, "a sketched covariance is for kron_eig"
        return eigen_factor_from_sketch(summed.product * scale, summed.directions, summed.trace * scale, rank)
    factor = DenseFactor(summed * scale)
    return factor.compress(rank) if rank else factor
