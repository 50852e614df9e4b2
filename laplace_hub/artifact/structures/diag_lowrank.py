"""``diag_lowrank`` (spec 1.1): a diagonal plus ``rank`` low-rank directions."""

from __future__ import annotations

from laplace_hub.artifact.findings import Sink
from laplace_hub.artifact.structures.base import Context, StructureCodec, TensorGetter, TensorStore
from laplace_hub.curvature import Block, DiagLowRankBlock
from laplace_hub.manifest import DiagLowRankBlockEntry, Param


class DiagLowRank(StructureCodec):
    """The ``diag_lowrank`` structure."""

    name = "diag_lowrank"
    entry = DiagLowRankBlockEntry
    key_fields = frozenset({"diagonal", "lowrank"})
    block_type = DiagLowRankBlock

    def encode(
        self, store: TensorStore, block: Block, prefix: str, param: Param, dataset: str | None
    ) -> DiagLowRankBlockEntry:
        assert isinstance(block, DiagLowRankBlock)
        return DiagLowRankBlockEntry(
            structure="diag_lowrank",
            param=param,
            dataset=dataset,
            diagonal=store.store(f"{prefix}.diagonal", block.diagonal),
            lowrank=store.store(f"{prefix}.lowrank", block.lowrank),
            rank=block.rank,
        )

    def decode(
        self, entry: DiagLowRankBlockEntry, at: Context, get: TensorGetter, sink: Sink | None
    ) -> DiagLowRankBlock:
        return DiagLowRankBlock(get(entry.diagonal), get(entry.lowrank))


CODEC = DiagLowRank()
