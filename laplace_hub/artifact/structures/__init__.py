"""The block structures, one module each, keyed by the name an entry's ``structure`` field holds.

Everything that differs between structures goes through :data:`REGISTRY`: the encoder (blocks →
entries + tensors), the decoder (entries → blocks), the value rules across a block's tensors, the
tensor-key fields a merge re-keys, and which manifest rules apply (Kronecker factors, LoRA pairs).
An entry's tensors and their shapes are its model's :meth:`tensors` in :mod:`laplace_hub.manifest`.
"""

from __future__ import annotations

from typing import Any

from laplace_hub.artifact.structures import diag, diag_lowrank, kron, kron_eig, kron_tridiag
from laplace_hub.artifact.structures.base import Context, MaybeTensor, StructureCodec, TensorGetter, TensorStore
from laplace_hub.errors import StructureError

REGISTRY: dict[str, StructureCodec] = {
    module.CODEC.name: module.CODEC for module in (diag, diag_lowrank, kron, kron_eig, kron_tridiag)
}


def codec_for(entry: Any) -> StructureCodec:
    """The codec of a block entry (by its ``structure``)."""
    try:
        return REGISTRY[entry.structure]
    except KeyError:
        raise StructureError(f"no codec for structure {entry.structure!r}") from None


__all__ = ["REGISTRY", "Context", "MaybeTensor", "StructureCodec", "TensorGetter", "TensorStore", "codec_for"]
