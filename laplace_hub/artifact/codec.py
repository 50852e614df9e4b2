"""Blocks to manifest entries plus tensors, and back: the only code that knows both sides.

Factors shared between blocks (the same :class:`Factor` object, e.g. one ``Σx`` for q/k/v) are
stored once: the first key that names a factor is reused by every later block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from laplace_hub.artifact.values import cross_norm, ridged
from laplace_hub.curvature import (
    Block,
    DenseFactor,
    DiagBlock,
    DiagLowRankBlock,
    EigenFactor,
    Factor,
    KronBlock,
    LoraPairBlock,
    WeightBlock,
    pack_symmetric,
    unpack_symmetric,
)
from laplace_hub.errors import StructureError
from laplace_hub.manifest import (
    BlockEntry,
    DiagBlockEntry,
    DiagLowRankBlockEntry,
    DType,
    EigenFactorRef,
    FactorRef,
    KronBlockEntry,
    KronEigBlockEntry,
    KronTridiagBlockEntry,
)

TensorGetter = Callable[[str], Tensor]


class BlockEncoder:
    """Turns blocks into entries, collecting the tensors to store and sharing factors by identity."""

    def __init__(self, packed: bool = False) -> None:
        self.packed = packed
        self.tensors: dict[str, Tensor] = {}
        self._refs: dict[int, tuple[Factor, FactorRef | EigenFactorRef]] = {}  # keeps factors alive: ids stay unique

    def _store(self, key: str, tensor: Tensor) -> str:
        self.tensors[key] = tensor.detach().contiguous()
        return key

    def _factor(self, factor: Factor, key: str) -> FactorRef:
        _, ref = self._refs.get(id(factor), (factor, None))
        if isinstance(ref, FactorRef):
            return ref
        matrix = factor.dense()
        packed = self.packed and matrix.shape[0] > 1
        ref = FactorRef(key=self._store(key, pack_symmetric(matrix) if packed else matrix), packed=packed)
        self._refs[id(factor)] = (factor, ref)
        return ref

    def _eigen(self, factor: Factor, key: str) -> EigenFactorRef:
        _, ref = self._refs.get(id(factor), (factor, None))
        if isinstance(ref, EigenFactorRef):
            return ref
        if not isinstance(factor, EigenFactor):
            raise StructureError("a kron_eig block needs eigen-truncated factors on both sides")
        ref = EigenFactorRef(
            eigenvalues=self._store(f"{key}.eigenvalues", factor.eigenvalues),
            eigenvectors=self._store(f"{key}.eigenvectors", factor.eigenvectors),
            rank=int(factor.eigenvalues.shape[0]),
            tail=float(factor.tail),
        )
        self._refs[id(factor)] = (factor, ref)
        return ref

    def encode(self, block: Block, module: str, dataset: str | None) -> list[BlockEntry]:
        """Entries (one, or two for a block-diagonal LoRA pair) describing ``block``."""
        tag = dataset or "all"
        if isinstance(block, LoraPairBlock):
            if block.cross_input is None or block.cross_output is None:
                return [
                    *self._weight(block.a, module, "lora_A", dataset, tag),
                    *self._weight(block.b, module, "lora_B", dataset, tag),
                ]
            if not (isinstance(block.a, KronBlock) and isinstance(block.b, KronBlock)):
                raise StructureError("kron_tridiag needs Kronecker blocks for A and B")
            prefix = f"{module}.lora_AB.{tag}"
            return [
                KronTridiagBlockEntry(
                    structure="kron_tridiag",
                    param="lora_AB",
                    dataset=dataset,
                    a_input=self._factor(block.a.input, f"{prefix}.a_input"),
                    a_output=self._factor(block.a.output, f"{prefix}.a_output"),
                    b_input=self._factor(block.b.input, f"{prefix}.b_input"),
                    b_output=self._factor(block.b.output, f"{prefix}.b_output"),
                    cross_input=self._store(f"{prefix}.cross_input", block.cross_input),
                    cross_output=self._store(f"{prefix}.cross_output", block.cross_output),
                )
            ]
        if not isinstance(block, WeightBlock):
            raise StructureError(f"cannot store a {type(block).__name__}; sum or merge it first")
        return self._weight(block, module, "weight", dataset, tag)

    def _weight(self, block: WeightBlock, module: str, param: str, dataset: str | None, tag: str) -> list[BlockEntry]:
        prefix = f"{module}.{param}.{tag}"
        if isinstance(block, DiagBlock):
            key = self._store(f"{prefix}.diagonal", block.diagonal)
            return [DiagBlockEntry(structure="diag", param=param, dataset=dataset, diagonal=key)]  # type: ignore[arg-type]
        if isinstance(block, DiagLowRankBlock):
            return [
                DiagLowRankBlockEntry(
                    structure="diag_lowrank",
                    param=param,  # type: ignore[arg-type]
                    dataset=dataset,
                    diagonal=self._store(f"{prefix}.diagonal", block.diagonal),
                    lowrank=self._store(f"{prefix}.lowrank", block.lowrank),
                    rank=block.rank,
                )
            ]
        if isinstance(block, KronBlock) and block.structure == "kron_eig":
            return [
                KronEigBlockEntry(
                    structure="kron_eig",
                    param=param,  # type: ignore[arg-type]
                    dataset=dataset,
                    input=self._eigen(block.input, f"{prefix}.input"),
                    output=self._eigen(block.output, f"{prefix}.output"),
                )
            ]
        if isinstance(block, KronBlock):
            return [
                KronBlockEntry(
                    structure="kron",
                    param=param,  # type: ignore[arg-type]
                    dataset=dataset,
                    input=self._factor(block.input, f"{prefix}.input"),
                    output=self._factor(block.output, f"{prefix}.output"),
                )
            ]
        raise StructureError(f"cannot store a {type(block).__name__}")


def _load_factor(ref: FactorRef, n: int, get: TensorGetter, dtype: DType) -> DenseFactor:
    tensor = get(ref.key)
    return DenseFactor(ridged(unpack_symmetric(tensor, n) if ref.packed else tensor, dtype))


def _load_eigen(ref: EigenFactorRef, get: TensorGetter) -> EigenFactor:
    # eigenvalues below the tail by rounding are clipped to it: then λ − tail ≥ 0 and F is PSD for any V
    return EigenFactor(get(ref.eigenvectors), get(ref.eigenvalues).clamp_min(ref.tail), ref.tail)


def decode_weight_block(entry: BlockEntry, dims: tuple[int, int], get: TensorGetter, dtype: DType) -> WeightBlock:
    """The block a diag/diag_lowrank/kron/kron_eig entry describes, over a matrix of ``dims = (d_out, d_in)``.

    ``dtype`` is the stored dtype, whose tolerance sets the ridge of dense factors (SPEC.md §8.3).
    """
    d_out, d_in = dims
    if isinstance(entry, DiagBlockEntry):
        return DiagBlock(get(entry.diagonal))
    if isinstance(entry, DiagLowRankBlockEntry):
        return DiagLowRankBlock(get(entry.diagonal), get(entry.lowrank))
    if isinstance(entry, KronBlockEntry):
        return KronBlock(_load_factor(entry.input, d_in, get, dtype), _load_factor(entry.output, d_out, get, dtype))
    if isinstance(entry, KronEigBlockEntry):
        return KronBlock(_load_eigen(entry.input, get), _load_eigen(entry.output, get))
    raise StructureError(f"{entry.structure} is not a single-matrix block")


def decode_tridiag(
    entry: KronTridiagBlockEntry, shape: tuple[int, int], rank: int, get: TensorGetter, dtype: DType
) -> tuple[LoraPairBlock, float]:
    """The LoRA pair block a ``kron_tridiag`` entry describes, and its cross norm (PSD iff ``≤ 1``).

    A cross norm a hair above 1 (rounding) is scaled down to 1 here; far above, the reader refuses.
    """
    d_out, d_in = shape
    a = KronBlock(_load_factor(entry.a_input, d_in, get, dtype), _load_factor(entry.a_output, rank, get, dtype))
    b = KronBlock(_load_factor(entry.b_input, rank, get, dtype), _load_factor(entry.b_output, d_out, get, dtype))
    cross_input, cross_output = get(entry.cross_input), get(entry.cross_output)
    norm = cross_norm(a.input.dense(), a.output.dense(), b.input.dense(), b.output.dense(), cross_input, cross_output)
    if norm > 1:
        cross_output = cross_output / norm
    return LoraPairBlock(a, b, cross_input, cross_output), norm


def as_dtype(get: TensorGetter, dtype: torch.dtype, device: torch.device | str | None) -> TensorGetter:
    """Wrap a getter so that every tensor arrives in ``dtype`` on ``device``."""
    return lambda key: get(key).to(device=device, dtype=dtype)
