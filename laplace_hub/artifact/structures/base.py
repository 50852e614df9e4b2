"""What a block structure provides besides its manifest entry: the codec and the rules across its tensors.

A structure is one module of this package holding one :class:`StructureCodec`; its entry model
(which tensors it references, with which shapes) lives in :mod:`laplace_hub.manifest`, which the
JSON Schema is generated from.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from torch import Tensor

from laplace_hub.artifact.findings import Sink
from laplace_hub.artifact.values import psd_part
from laplace_hub.curvature import Block, DenseFactor, Factor, unpack_symmetric
from laplace_hub.manifest import (
    BlockEntry,
    DType,
    EigenFactorRef,
    FactorRef,
    LoraParameterization,
    Manifest,
    ModuleEntry,
    Param,
)

TensorGetter = Callable[[str], Tensor]
MaybeTensor = Callable[[str], Tensor | None]  # None: the tensor is missing or broke a rule already


class TensorStore(Protocol):
    """Where an encoder puts tensors: factors shared between blocks (the same object) are stored once."""

    def store(self, key: str, tensor: Tensor) -> str:
        """Keep ``tensor`` under ``key``; returns the key."""
        ...

    def factor(self, factor: Factor, key: str) -> FactorRef:
        """A dense factor, stored (full or packed) under ``key`` unless stored before."""
        ...

    def eigen(self, factor: Factor, key: str) -> EigenFactorRef:
        """An eigen-truncated factor, stored under ``key.eigenvalues`` and ``key.eigenvectors``."""
        ...


@dataclass(frozen=True)
class Context:
    """Where a block is read: its module's ``(d_out, d_in)``, the LoRA rank (if any) and the stored dtype."""

    shape: tuple[int, int]
    rank: int | None
    dtype: DType

    @classmethod
    def of(cls, manifest: Manifest, module: ModuleEntry) -> Context:
        """The context of a module of ``manifest``."""
        lora = manifest.parameterization
        rank = lora.rank if isinstance(lora, LoraParameterization) else None
        return cls((module.shape[0], module.shape[1]), rank, manifest.dtype)


class StructureCodec(ABC):
    """One block structure: its name, its entry model, and how its blocks are stored and read back."""

    name: ClassVar[str]
    entry: ClassVar[type[Any]]  # the pydantic entry model of laplace_hub.manifest
    key_fields: ClassVar[frozenset[str]]  # fields of the entry (and of its refs) that hold tensor keys
    kronecker: ClassVar[bool] = False  # built from Kronecker factors: the manifest must say kfac_approx
    pair: ClassVar[bool] = False  # covers a LoRA pair as a whole (param lora_AB)

    block_type: ClassVar[type[Block]]  # the curvature block it stores

    def encodes(self, block: Block) -> bool:
        """Whether ``block`` is stored with this structure."""
        return isinstance(block, self.block_type)

    @abstractmethod
    def encode(self, store: TensorStore, block: Block, prefix: str, param: Param, dataset: str | None) -> BlockEntry:
        """The entry describing ``block``, its tensors put in ``store`` under keys starting with ``prefix``."""

    @abstractmethod
    def decode(self, entry: Any, at: Context, get: TensorGetter, sink: Sink | None) -> Block:
        """The block ``entry`` describes, its dense factors as readers decode them (SPEC.md §8.3).

        With a ``sink``, the rules across the block's tensors that decoding meets are reported there,
        located at the tensor they concern.
        """

    def check(self, sink: Sink, where: str, entry: Any, at: Context, get: MaybeTensor) -> None:
        """The value rules across the entry's tensors (SPEC.md §8.3), located at ``where``; none by default."""
        return None


def load_factor(ref: FactorRef, n: int, get: TensorGetter) -> DenseFactor:
    """A stored dense factor (full or packed) as readers decode it: its symmetric part's PSD part (SPEC.md §8.3)."""
    tensor = get(ref.key)
    return DenseFactor(psd_part(unpack_symmetric(tensor, n) if ref.packed else tensor))
