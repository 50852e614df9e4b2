"""``kron_eig``: Kronecker factors kept as their top eigenpairs plus the mean of the others (the tail)."""

from __future__ import annotations

from typing import Any

from laplace_hub.artifact.findings import Sink
from laplace_hub.artifact.structures.base import Context, MaybeTensor, TensorGetter, TensorStore
from laplace_hub.artifact.structures.kron import Kron
from laplace_hub.artifact.values import check_tail
from laplace_hub.curvature import EigenFactor, Factor, KronBlock
from laplace_hub.manifest import EigenFactorRef, FactorRef, KronEigBlockEntry


class KronEig(Kron):
    """The ``kron_eig`` structure: ``kron`` with eigen-truncated factors, whose kept eigenvalues are ≥ the tail."""

    name = "kron_eig"
    entry = KronEigBlockEntry
    key_fields = frozenset({"eigenvalues", "eigenvectors"})

    def store_factor(self, store: TensorStore, factor: Factor, key: str) -> FactorRef | EigenFactorRef:
        return store.eigen(factor, key)

    def load(self, ref: EigenFactorRef, n: int, get: TensorGetter) -> EigenFactor:
        # eigenvalues below the tail by rounding are clipped to it: then λ − tail ≥ 0 and F is PSD for any V
        return EigenFactor(get(ref.eigenvectors), get(ref.eigenvalues).clamp_min(ref.tail), ref.tail)

    def decode(self, entry: KronEigBlockEntry, at: Context, get: TensorGetter, sink: Sink | None) -> KronBlock:
        if sink is not None:  # the tail rule as a reader meets it, located at the eigenvalues
            for ref in (entry.input, entry.output):
                check_tail(sink, ref.eigenvalues, get(ref.eigenvalues), ref.tail, at.dtype)
        return super().decode(entry, at, get, sink)

    def check(self, sink: Sink, where: str, entry: Any, at: Context, get: MaybeTensor) -> None:
        for side, ref in (("input", entry.input), ("output", entry.output)):
            eigenvalues = get(ref.eigenvalues)
            if eigenvalues is not None:
                check_tail(sink, f"{where}.{side}", eigenvalues, ref.tail, at.dtype)


CODEC = KronEig()
