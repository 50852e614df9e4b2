"""``kron_tridiag``: a LoRA A/B pair as one block, Kronecker diagonal blocks plus a Kronecker cross block.

The block is PSD as a whole iff its cross norm is at most 1 (SPEC.md §8.3): checked across its tensors.
"""

from __future__ import annotations

import torch

from laplace_hub.artifact.findings import Sink
from laplace_hub.artifact.structures.base import (
    Context,
    MaybeTensor,
    StructureCodec,
    TensorGetter,
    TensorStore,
    load_factor,
)
from laplace_hub.artifact.values import check_cross, cross_norm
from laplace_hub.curvature import Block, KronBlock, LoraPairBlock
from laplace_hub.errors import StructureError
from laplace_hub.manifest import KronTridiagBlockEntry, Param


class KronTridiag(StructureCodec):
    """The ``kron_tridiag`` structure (B-Tri-K-FAC)."""

    name = "kron_tridiag"
    entry = KronTridiagBlockEntry
    key_fields = frozenset({"key", "cross_input", "cross_output"})
    block_type = LoraPairBlock
    kronecker = True
    pair = True

    def encodes(self, block: Block) -> bool:
        return isinstance(block, LoraPairBlock) and block.cross_input is not None and block.cross_output is not None

    def encode(
        self, store: TensorStore, block: Block, prefix: str, param: Param, dataset: str | None
    ) -> KronTridiagBlockEntry:
        assert isinstance(block, LoraPairBlock) and block.cross_input is not None and block.cross_output is not None
        if not (isinstance(block.a, KronBlock) and isinstance(block.b, KronBlock)):
            raise StructureError("kron_tridiag needs Kronecker blocks for A and B")
        return KronTridiagBlockEntry(
            structure="kron_tridiag",
            param=param,
            dataset=dataset,
            a_input=store.factor(block.a.input, f"{prefix}.a_input"),
            a_output=store.factor(block.a.output, f"{prefix}.a_output"),
            b_input=store.factor(block.b.input, f"{prefix}.b_input"),
            b_output=store.factor(block.b.output, f"{prefix}.b_output"),
            cross_input=store.store(f"{prefix}.cross_input", block.cross_input),
            cross_output=store.store(f"{prefix}.cross_output", block.cross_output),
        )

    def decode(self, entry: KronTridiagBlockEntry, at: Context, get: TensorGetter, sink: Sink | None) -> LoraPairBlock:
        if at.rank is None:
            raise StructureError("kron_tridiag needs the lora parameterization")
        block, norm = decode_tridiag(entry, at.shape, at.rank, get)
        if sink is not None:
            check_cross(sink, entry.cross_output, norm, at.dtype)
        return block

    def check(self, sink: Sink, where: str, entry: KronTridiagBlockEntry, at: Context, get: MaybeTensor) -> None:
        if at.rank is None:
            return  # the manifest rules report kron_tridiag outside the lora parameterization
        refs = (entry.a_input, entry.a_output, entry.b_input, entry.b_output)
        tensors = {key: get(key) for key in (*(r.key for r in refs), entry.cross_input, entry.cross_output)}
        if all(t is not None for t in tensors.values()):
            getter = lambda key: tensors[key].to(torch.float64)  # type: ignore[union-attr]  # noqa: E731
            check_cross(sink, where, decode_tridiag(entry, at.shape, at.rank, getter)[1], at.dtype)


def decode_tridiag(
    entry: KronTridiagBlockEntry, shape: tuple[int, int], rank: int, get: TensorGetter
) -> tuple[LoraPairBlock, float]:
    """The LoRA pair block a ``kron_tridiag`` entry describes, and its cross norm (PSD iff ``≤ 1``).

    A cross norm a hair above 1 (rounding) is scaled down to 1 here; far above, the reader refuses.
    """
    d_out, d_in = shape
    a = KronBlock(load_factor(entry.a_input, d_in, get), load_factor(entry.a_output, rank, get))
    b = KronBlock(load_factor(entry.b_input, rank, get), load_factor(entry.b_output, d_out, get))
    cross_input, cross_output = get(entry.cross_input), get(entry.cross_output)
    norm = cross_norm(a.input.dense(), a.output.dense(), b.input.dense(), b.output.dense(), cross_input, cross_output)
    if norm > 1:
        cross_output = cross_output / norm
    return LoraPairBlock(a, b, cross_input, cross_output), norm


CODEC = KronTridiag()
