"""``diag``: one precision value per parameter entry."""

from __future__ import annotations

from laplace_hub.artifact.findings import Sink
from laplace_hub.artifact.structures.base import Context, StructureCodec, TensorGetter, TensorStore
from laplace_hub.curvature import Block, DiagBlock
from laplace_hub.manifest import DiagBlockEntry, Param


class Diag(StructureCodec):
    """The ``diag`` structure."""

    name = "diag"
    entry = DiagBlockEntry
    key_fields = frozenset({"diagonal"})
    block_type = DiagBlock

    def encode(
        self, store: TensorStore, block: Block, prefix: str, param: Param, dataset: str | None
    ) -> DiagBlockEntry:
        assert isinstance(block, DiagBlock)
        key = store.store(f"{prefix}.diagonal", block.diagonal)
        return DiagBlockEntry(structure="diag", param=param, dataset=dataset, diagonal=key)

    def decode(self, entry: DiagBlockEntry, at: Context, get: TensorGetter, sink: Sink | None) -> DiagBlock:
        return DiagBlock(get(entry.diagonal))


CODEC = Diag()
