"""``kron``: ``Σg ⊗ Σx`` with dense factors, shared between blocks that share the factor object."""

from __future__ import annotations

from typing import Any, ClassVar

from laplace_hub.artifact.findings import Sink
from laplace_hub.artifact.structures.base import Context, StructureCodec, TensorGetter, TensorStore, load_factor
from laplace_hub.curvature import Block, Factor, KronBlock
from laplace_hub.manifest import BlockEntry, EigenFactorRef, FactorRef, KronBlockEntry, Param


class Kron(StructureCodec):
    """The ``kron`` structure; its two factors are stored and read by :meth:`store_factor` and :meth:`load`."""

    name = "kron"
    entry: ClassVar[type[Any]] = KronBlockEntry  # kron_eig's entry is not a subclass of it
    key_fields = frozenset({"key"})
    block_type = KronBlock
    kronecker = True

    def encodes(self, block: Block) -> bool:
        return isinstance(block, KronBlock) and block.structure == self.name

    def encode(self, store: TensorStore, block: Block, prefix: str, param: Param, dataset: str | None) -> BlockEntry:
        assert isinstance(block, KronBlock)
        return self.entry(
            structure=self.name,
            param=param,
            dataset=dataset,
            input=self.store_factor(store, block.input, f"{prefix}.input"),
            output=self.store_factor(store, block.output, f"{prefix}.output"),
        )

    def decode(self, entry: Any, at: Context, get: TensorGetter, sink: Sink | None) -> KronBlock:
        d_out, d_in = entry.dims(at.shape, at.rank)
        return KronBlock(self.load(entry.input, d_in, get), self.load(entry.output, d_out, get))

    def store_factor(self, store: TensorStore, factor: Factor, key: str) -> FactorRef | EigenFactorRef:
        """Store one factor of a block."""
        return store.factor(factor, key)

    def load(self, ref: Any, n: int, get: TensorGetter) -> Factor:
        """Read one factor (``n × n``) back."""
        return load_factor(ref, n, get)


CODEC = Kron()
