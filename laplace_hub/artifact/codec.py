"""Blocks to manifest entries plus tensors, and back, through the structure registry.

Factors shared between blocks (the same :class:`Factor` object, e.g. one ``Σx`` for q/k/v) are
stored once: the first key that names a factor is reused by every later block. What each
structure stores, and how it is read back, is its module's in :mod:`laplace_hub.artifact.structures`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from laplace_hub.artifact.structures import REGISTRY, TensorGetter
from laplace_hub.curvature import Block, EigenFactor, Factor, LoraPairBlock, WeightBlock, pack_symmetric
from laplace_hub.errors import StructureError
from laplace_hub.manifest import BlockEntry, EigenFactorRef, FactorRef, Param

__all__ = ["BlockEncoder", "TensorGetter", "as_dtype"]


class BlockEncoder:
    """Turns blocks into entries, collecting the tensors to store and sharing factors by identity."""

    def __init__(self, packed: bool = False) -> None:
        self.packed = packed
        self.tensors: dict[str, Tensor] = {}
        self.factor_keys: set[str] = set()  # the keys of dense factors (mended for their dtype when stored)
        self._refs: dict[int, tuple[Factor, FactorRef | EigenFactorRef]] = {}  # keeps factors alive: ids stay unique

    def release(self) -> dict[str, Tensor]:
        """The tensors collected so far, handed over and forgotten here, with every factor they came from.

        For producers that store each pass's blocks as it ends: a factor shared by later blocks must
        not span a release (modules that share an input are computed in the same pass).
        """
        tensors, self.tensors, self._refs = self.tensors, {}, {}
        return tensors

    def store(self, key: str, tensor: Tensor) -> str:
        """Keep ``tensor`` under ``key``; returns the key."""
        self.tensors[key] = tensor.detach().contiguous()
        return key

    def factor(self, factor: Factor, key: str) -> FactorRef:
        """A dense factor, stored (full or packed) under ``key`` unless this object was stored before."""
        _, ref = self._refs.get(id(factor), (factor, None))
        if isinstance(ref, FactorRef):
            return ref
        matrix = factor.dense()
        packed = self.packed and matrix.shape[0] > 1
        ref = FactorRef(key=self.store(key, pack_symmetric(matrix) if packed else matrix), packed=packed)
        self.factor_keys.add(key)
        self._refs[id(factor)] = (factor, ref)
        return ref

    def eigen(self, factor: Factor, key: str) -> EigenFactorRef:
        """An eigen-truncated factor, stored under ``key.eigenvalues``/``key.eigenvectors`` unless stored before."""
        _, ref = self._refs.get(id(factor), (factor, None))
        if isinstance(ref, EigenFactorRef):
            return ref
        if not isinstance(factor, EigenFactor):
            raise StructureError("a kron_eig block needs eigen-truncated factors on both sides")
        ref = EigenFactorRef(
            eigenvalues=self.store(f"{key}.eigenvalues", factor.eigenvalues),
            eigenvectors=self.store(f"{key}.eigenvectors", factor.eigenvectors),
            rank=int(factor.eigenvalues.shape[0]),
            tail=float(factor.tail),
        )
        self._refs[id(factor)] = (factor, ref)
        return ref

    def encode(self, block: Block, module: str, dataset: str | None) -> list[BlockEntry]:
        """Entries (one, or two for a block-diagonal LoRA pair) describing ``block``."""
        if isinstance(block, LoraPairBlock):
            if block.cross_input is None or block.cross_output is None:
                return [
                    self._entry(block.a, module, "lora_A", dataset),
                    self._entry(block.b, module, "lora_B", dataset),
                ]
            return [self._entry(block, module, "lora_AB", dataset)]
        if not isinstance(block, WeightBlock):
            raise StructureError(f"cannot store a {type(block).__name__}; sum or merge it first")
        return [self._entry(block, module, "weight", dataset)]

    def _entry(self, block: Block, module: str, param: Param, dataset: str | None) -> BlockEntry:
        prefix = f"{module}.{param}.{dataset or 'all'}"
        for codec in REGISTRY.values():
            if codec.encodes(block):
                return codec.encode(self, block, prefix, param, dataset)
        raise StructureError(f"cannot store a {type(block).__name__}")


def as_dtype(get: TensorGetter, dtype: torch.dtype, device: torch.device | str | None) -> TensorGetter:
    """Wrap a getter so that every tensor arrives in ``dtype`` on ``device``."""
    return lambda key: get(key).to(device=device, dtype=dtype)
