"""Compact artifacts: an existing artifact turned into a smaller valid one, without recomputing curvature.

Each step transforms stored tensors and keeps the penalty as close as the smaller form allows:

* ``kron`` → ``kron_eig`` at rank ``k`` (weight-space blocks): each dense factor becomes its top-``k``
  eigenpairs plus the mean of its other eigenvalues (the tail), decomposed as readers decode it
  (the PSD part, SPEC.md §8.3), so at full rank the block is the source's;
* lower ranks: a ``kron_eig`` factor of rank ``k > k'`` keeps its top ``k'`` pairs and its tail takes
  in the dropped eigenvalues, ``t' = (Σ dropped λ + (n − k)·t) / (n − k')`` (the mean of all the
  others, as if truncated from the full spectrum); a ``diag_lowrank`` block keeps its top ``k'``
  directions and the squares of the dropped ones go back into the diagonal, ``D' = D + Σ_dropped Uⱼ²``,
  so that ``diag(P)`` is unchanged and ``U'U'ᵀ ⪯ UUᵀ ⪯ P`` still holds;
* a lower dtype (``float32`` → ``bfloat16`` or ``float16``; never up: that keeps the rounding and
  doubles the bytes). Dense factors are rounded as writers store them (:func:`psd_for_storage`);
  readers decode the PSD part of what is stored, so the penalty moves only by the rounding itself.

LoRA-parameterised Kronecker blocks (``kron`` on ``lora_A``/``lora_B``, ``kron_tridiag``) keep
their dense factors: one side is ``r × r`` already, and ``kron_tridiag`` is PSD only as a whole, through
its dense factors. Datasets, lineage, base model and LoRA inits are kept; the manifest's
``software`` records where the result came from.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Hashable
from typing import Any

import torch
from pydantic import ValidationError
from torch import Tensor

from laplace_hub.artifact.artifact import Artifact
from laplace_hub.artifact.builder import software_versions, storable_factor
from laplace_hub.artifact.merge import manifest_sha256
from laplace_hub.artifact.store import tensor_dtype
from laplace_hub.artifact.structures.kron_tridiag import decode_tridiag
from laplace_hub.artifact.values import psd_part
from laplace_hub.curvature import unpack_symmetric
from laplace_hub.errors import ArtifactError
from laplace_hub.manifest import (
    MAX_KEY_LENGTH,
    DiagBlockEntry,
    DiagLowRankBlockEntry,
    DType,
    EigenFactorRef,
    FactorRef,
    KronBlockEntry,
    KronEigBlockEntry,
    KronTridiagBlockEntry,
    Manifest,
    ModuleEntry,
    expected_tensors,
    first_problem,
    required_version,
    unknown_fields,
)
from laplace_hub.progress import progress

__all__ = ["PROVENANCE_KEY", "compress"]

PROVENANCE_KEY = "laplace-hub.compress"
# Bits of mantissa: a conversion may only lose them. float16 and bfloat16 trade range for mantissa,
# so neither is "lower" than the other: go from the float32 artifact instead of rounding twice.
_PRECISION: dict[str, int] = {"float64": 52, "float32": 23, "float16": 10, "bfloat16": 7}
_FLOAT16_MAX = float(torch.finfo(torch.float16).max)


def compress(
    artifact: Artifact, *, rank: int | None = None, dtype: DType | None = None, source: str | None = None
) -> Artifact:
    """A smaller artifact holding (nearly) the same precision: lower ranks, eigen-truncated factors, a lower dtype.

    Args:
        artifact: The artifact to compress (opened, or built in memory).
        rank: The largest rank to keep: ``kron`` blocks become ``kron_eig`` at this rank (it must be
            below every factor's side), ``kron_eig`` factors and ``diag_lowrank`` blocks of a higher
            rank are truncated to it; ``None`` keeps every rank.
        dtype: The stored dtype of the result, at most as precise as the artifact's (``None``: the same).
        source: Where ``artifact`` was read from, for the provenance record (default: its folder).

    Returns:
        The compact artifact, in memory (save it with :meth:`Artifact.save`).

    Raises:
        ArtifactError: nothing to do, a rank of 0 or one that lowers nothing, a rank not below a
            ``kron`` factor's side, a dtype that would raise precision (or round twice), values that
            overflow ``float16``, or fields this reader does not know.

    Example:
        >>> import torch
        >>> from laplace_hub.artifact import ArtifactBuilder, minimal_fields
        >>> from laplace_hub.curvature import DenseFactor, KronBlock
        >>> builder = ArtifactBuilder(dtype="float32")
        >>> builder.add("layer", (4, 6), KronBlock(DenseFactor(torch.eye(6)), DenseFactor(torch.eye(4))))
        >>> small = compress(builder.build(**minimal_fields()), rank=2, dtype="bfloat16")
        >>> small.manifest.dtype, small.manifest.modules["layer"].blocks[0].structure
        ('bfloat16', 'kron_eig')

    """
    m = artifact.manifest
    extra = list(unknown_fields(m))
    if extra:
        raise ArtifactError(
            f"the artifact has fields this reader does not know ({', '.join(extra[:3])}); "
            "compressing would drop them: upgrade laplace-hub",
            location=extra[0],
        )
    if rank is None and dtype is None:
        raise ArtifactError("nothing to do: give a `rank`, a `dtype` or both")
    if rank is not None and rank < 1:
        raise ArtifactError(f"must be ≥ 1, got {rank}", location="rank")
    target = dtype or m.dtype
    _check_dtype(m.dtype, target)
    compressor = _Compressor(artifact, rank, target)
    # eigendecompositions and casts: minutes for a large artifact
    modules = {
        name: compressor.module(name, entry)
        for name, entry in progress(m.modules.items(), desc="compress", unit="module")
    }
    if rank is not None and not compressor.lowered:
        raise ArtifactError(
            f"{rank} lowers no rank of this artifact ({compressor.ranks_seen()}); compress only lowers ranks "
            "(kron_eig, diag_lowrank, weight-space kron)",
            location="rank",
        )
    software = {**m.software, _provenance_key(m.software): _provenance(artifact, source, rank, m.dtype, target)}
    try:
        data = {name: getattr(m, name) for name in Manifest.model_fields}
        data.update(dtype=target, modules=modules, files={}, software=software)
        manifest = Manifest(**data)
    except ValidationError as e:
        where, message = first_problem(e)
        raise ArtifactError(f"the compressed manifest would break the spec: {message}", location=where) from e
    manifest = manifest.model_copy(update={"spec_version": required_version(manifest)})
    return Artifact(manifest, compressor.tensors.__getitem__)


def _check_dtype(current: DType, wanted: DType) -> None:
    if wanted == current:
        return
    if {wanted, current} == {"float16", "bfloat16"}:
        raise ArtifactError(
            f"{current} → {wanted} would round twice (the two trade mantissa for range); compress the float32 "
            "artifact instead",
            location="dtype",
        )
    if _PRECISION[wanted] > _PRECISION[current]:
        raise ArtifactError(
            f"{wanted} would raise the precision of a {current} artifact: the values keep {current}'s rounding "
            f"and take more bytes; compress lowers precision only (recompute to get {wanted})",
            location="dtype",
        )


def _provenance_key(software: dict[str, str]) -> str:
    """``laplace-hub.compress``, numbered when the artifact was compressed before (the record is kept)."""
    key, n = PROVENANCE_KEY, 2
    while key in software:
        key, n = f"{PROVENANCE_KEY}.{n}", n + 1
    return key


def _provenance(artifact: Artifact, source: str | None, rank: int | None, was: DType, now: DType) -> str:
    where = source or (str(artifact.path) if artifact.path is not None else "an in-memory artifact")
    version = software_versions().get("laplace-hub", "unknown")
    return (
        f"laplace-hub {version}: from {where} (laplace.json sha256 {manifest_sha256(artifact)}); "
        f"rank={rank if rank is not None else 'unchanged'}; dtype={was}->{now}"
    )


class _Compressor:
    """Transforms entries and their tensors; a tensor derived twice the same way is stored once.

    Keys are kept where they can be (a shared key stays shared: q/k/v's one ``Σx`` becomes one
    eigen-pair of tensors); a derived tensor whose key is taken gets a numbered variant.
    """

    def __init__(self, artifact: Artifact, rank: int | None, dtype: DType) -> None:
        self.artifact = artifact
        self.rank = rank
        self.dtype = dtype
        self.specs = expected_tensors(artifact.manifest)
        self.lora_rank: int | None = getattr(artifact.manifest.parameterization, "rank", None)
        self.tensors: dict[str, Tensor] = {}
        self.lowered = False  # whether any rank went down
        self.ranks: set[str] = set()  # what has a rank, for the error when none is lowered
        self._derived: dict[Hashable, str] = {}
        self._cache: dict[Hashable, Any] = {}

    def ranks_seen(self) -> str:
        return ", ".join(sorted(self.ranks)) or "it has no block with a rank"

    # --- tensors -------------------------------------------------------------------------------

    def put(self, key: str, derivation: Hashable, make: Callable[[], Tensor]) -> str:
        """Store ``make()`` under ``key`` (or a free variant of it) unless ``derivation`` was stored before."""
        if derivation in self._derived:
            return self._derived[derivation]
        candidate, n = _fit(key), 2
        while candidate in self.tensors:
            candidate, n = _fit(f"{key}.{n}"), n + 1
        self.tensors[candidate] = make().contiguous()
        self._derived[derivation] = candidate
        return candidate

    def copy(self, key: str) -> str:
        """A stored tensor in the new dtype (dense factors mended as writers do; LoRA inits as they are)."""

        def make() -> Tensor:
            tensor, spec = self.artifact.tensor(key), self.specs[key]
            if spec.role == "init" or spec.dtype == self.dtype:
                return tensor
            if spec.role == "factor":
                _check_range(key, tensor, self.dtype)
                return storable_factor(tensor.double(), self.dtype)
            return self.lowered_tensor(key, tensor)

        return self.put(key, ("copy", key), make)

    def lowered_tensor(self, key: str, tensor: Tensor) -> Tensor:
        """``tensor`` (stored or derived from ``key``) in the new dtype."""
        _check_range(key, tensor, self.dtype)
        return tensor.to(tensor_dtype(self.dtype))

    def once(self, derivation: Hashable, compute: Callable[[], Any]) -> Any:
        """``compute()``, computed on first use and remembered (an eigen-decomposition shared by q/k/v)."""
        if derivation not in self._cache:
            self._cache[derivation] = compute()
        return self._cache[derivation]

    # --- entries -------------------------------------------------------------------------------

    def module(self, name: str, module: ModuleEntry) -> ModuleEntry:
        blocks = [self.block(name, module, entry) for entry in module.blocks]
        init = module.lora_init
        if init is not None:
            init = init.model_copy(update={"lora_A": self.copy(init.lora_A), "lora_B": self.copy(init.lora_B)})
        return ModuleEntry(shape=module.shape, blocks=blocks, lora_init=init)

    def block(self, name: str, module: ModuleEntry, entry: Any) -> Any:
        if isinstance(entry, DiagBlockEntry):
            return entry.model_copy(update={"diagonal": self.copy(entry.diagonal)})
        if isinstance(entry, DiagLowRankBlockEntry):
            return self.diag_lowrank(entry)
        if isinstance(entry, KronEigBlockEntry):
            d_out, d_in = entry.dims(module.shape, self.lora_rank)
            refs = {"input": self.truncated(entry.input, d_in), "output": self.truncated(entry.output, d_out)}
            return entry.model_copy(update=refs)
        if isinstance(entry, KronBlockEntry) and entry.param == "weight" and self.rank is not None:
            d_out, d_in = module.shape
            return KronEigBlockEntry(
                structure="kron_eig",
                param=entry.param,
                dataset=entry.dataset,
                input=self.eigen(name, "input", entry.input, d_in),
                output=self.eigen(name, "output", entry.output, d_out),
            )
        # kron without a rank, LoRA-space kron, kron_tridiag: every tensor kept, in the new dtype
        if self.rank is not None:
            self.ranks.add(f"LoRA-space {entry.structure} (kept dense)")
        update: dict[str, Any] = {}
        for field, value in entry:
            if isinstance(value, FactorRef):
                update[field] = value.model_copy(update={"key": self.copy(value.key)})
            elif field in ("cross_input", "cross_output"):
                update[field] = self.copy(value)
        lowered = entry.model_copy(update=update)
        return self.mended_cross(lowered, module) if isinstance(lowered, KronTridiagBlockEntry) else lowered

    def mended_cross(self, entry: KronTridiagBlockEntry, module: ModuleEntry) -> KronTridiagBlockEntry:
        """A lowered ``kron_tridiag`` block whose cross block is scaled down until the stored block is PSD.

        Rounding its six tensors moves the cross norm (SPEC.md §8.2), by far more than the rounding when
        an ``r × r`` factor is ill-conditioned; writers mend that themselves, by the least scaling of the
        cross block that brings the norm back to 1, as readers would.
        """
        assert self.lora_rank is not None
        shape = (module.shape[0], module.shape[1])
        for _ in range(4):
            norm = decode_tridiag(entry, shape, self.lora_rank, lambda key: self.tensors[key].double())[1]
            if norm <= 1:
                break
            cross = self.tensors[entry.cross_output].double() / (norm * (1 + 2**-8))  # a hair below: rounding
            self.tensors[entry.cross_output] = cross.to(tensor_dtype(self.dtype))
        return entry

    def diag_lowrank(self, entry: DiagLowRankBlockEntry) -> DiagLowRankBlockEntry:
        self.ranks.add(f"diag_lowrank rank {entry.rank}")
        if self.rank is None or entry.rank <= self.rank:
            return entry.model_copy(update={"diagonal": self.copy(entry.diagonal), "lowrank": self.copy(entry.lowrank)})
        self.lowered = True
        k = self.rank
        derivation = ("diag_lowrank", entry.diagonal, entry.lowrank, k)

        def lowered() -> tuple[Tensor, Tensor]:
            diagonal, lowrank = self.artifact.tensor(entry.diagonal), self.artifact.tensor(entry.lowrank)
            return lower_diag_lowrank(diagonal.double(), lowrank.double(), k)

        def part(index: int, key: str) -> Callable[[], Tensor]:
            return lambda: self.lowered_tensor(key, self.once(derivation, lowered)[index])

        return entry.model_copy(
            update={
                "diagonal": self.put(entry.diagonal, (*derivation, "D"), part(0, entry.diagonal)),
                "lowrank": self.put(entry.lowrank, (*derivation, "U"), part(1, entry.lowrank)),
                "rank": k,
            }
        )

    def truncated(self, ref: EigenFactorRef, n: int) -> EigenFactorRef:
        """A kron_eig factor at rank at most ``self.rank`` (its tail taking in what is dropped)."""
        self.ranks.add(f"kron_eig rank {ref.rank}")
        if self.rank is None or ref.rank <= self.rank:
            update = {"eigenvalues": self.copy(ref.eigenvalues), "eigenvectors": self.copy(ref.eigenvectors)}
            return ref.model_copy(update=update)
        self.lowered = True
        k = self.rank
        eigenvalues = self.artifact.tensor(ref.eigenvalues)
        tail = truncated_tail(eigenvalues.double().clamp_min(ref.tail), ref.tail, n, k)
        values = self.put(
            ref.eigenvalues,
            ("eigenvalues", ref.eigenvalues, k),
            lambda: self.lowered_tensor(ref.eigenvalues, eigenvalues[:k]),
        )
        vectors = self.put(
            ref.eigenvectors,
            ("eigenvectors", ref.eigenvectors, k),
            lambda: self.lowered_tensor(ref.eigenvectors, self.artifact.tensor(ref.eigenvectors)[:, :k]),
        )
        return EigenFactorRef(eigenvalues=values, eigenvectors=vectors, rank=k, tail=tail)

    def eigen(self, module: str, side: str, ref: FactorRef, n: int) -> EigenFactorRef:
        """A dense factor as its top-``rank`` eigenpairs and tail (of the factor as readers decode it)."""
        assert self.rank is not None
        k = self.rank
        if k >= n:
            raise ArtifactError(
                f"{k} is not below the side {n} of module {module!r}'s {side} factor: a kron_eig factor at full "
                f"rank stores more than the dense one; choose a `rank` below {n}",
                location="rank",
            )
        self.ranks.add("kron")
        self.lowered = True
        key, derivation = ref.key, ("eigen", ref.key, k)

        def decomposed() -> tuple[Tensor, Tensor, float]:
            stored = self.artifact.tensor(key).double()
            matrix = unpack_symmetric(stored, n) if ref.packed else stored
            return eigen_truncate(psd_part(matrix), k)

        values, vectors, tail = self.once(derivation, decomposed)
        return EigenFactorRef(
            eigenvalues=self.put(
                f"{key}.eigenvalues", (*derivation, "values"), lambda: self.lowered_tensor(key, values)
            ),
            eigenvectors=self.put(
                f"{key}.eigenvectors", (*derivation, "vectors"), lambda: self.lowered_tensor(key, vectors)
            ),
            rank=k,
            tail=tail,
        )


def eigen_truncate(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """Top-``rank`` eigenvalues (non-increasing), their eigenvectors (``n × rank``) and the mean of the rest.

    Computed in float64 on the symmetric part; eigenvalues below 0 (rounding) count as 0.
    """
    sym = (matrix.double() + matrix.double().T) / 2
    values, vectors = torch.linalg.eigh(sym)
    values = values.clamp_min(0).flip(0)
    vectors = vectors.flip(1)
    n = values.shape[0]
    tail = float(values[rank:].mean()) if rank < n else 0.0
    return values[:rank], vectors[:, :rank], tail


def truncated_tail(eigenvalues: Tensor, tail: float, n: int, rank: int) -> float:
    """The tail of an eigen factor of side ``n`` (``k`` pairs and ``tail``) truncated to ``rank < k`` pairs.

    The dropped eigenvalues join the ``n − k`` that the tail stands for: the new tail is the mean of
    all ``n − rank`` eigenvalues outside the kept ones, what truncating the full spectrum gives.
    """
    k = eigenvalues.shape[0]
    return (float(eigenvalues[rank:].double().sum()) + (n - k) * tail) / (n - rank)


def lower_diag_lowrank(diagonal: Tensor, lowrank: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(D', U')`` with ``U'`` the top-``rank`` orthogonal directions of ``UUᵀ`` and ``D' = D + diag(UUᵀ − U'U'ᵀ)``.

    The directions need not be orthogonal (e.g. after a sum of blocks): the top ``rank`` come from
    the eigen-decomposition of the ``k × k`` Gram matrix ``U Uᵀ`` (over vectorised directions), which
    is the best rank-``rank`` approximation of ``UUᵀ``. For orthogonal ``U`` sorted by norm they are
    its first ``rank`` directions. ``diag(P)`` is unchanged and ``U'U'ᵀ ⪯ UUᵀ``.
    """
    k = lowrank.shape[0]
    flat = lowrank.reshape(k, -1).double()
    gram = flat @ flat.T
    values, vectors = torch.linalg.eigh((gram + gram.T) / 2)
    order = values.argsort(descending=True)
    rotated = vectors[:, order].T @ flat  # orthogonal rows with squared norms = eigenvalues of the Gram
    kept = rotated[:rank]
    dropped = (flat.square().sum(0) - kept.square().sum(0)).clamp_min(0)
    return (diagonal.double() + dropped.reshape(diagonal.shape)), kept.reshape(rank, *lowrank.shape[1:])


def _side(factor: Tensor) -> int:
    """``n`` of an ``n × n`` factor stored full or packed (``n(n+1)/2`` values)."""
    return int(factor.shape[0]) if factor.dim() == 2 else (math.isqrt(8 * factor.shape[0] + 1) - 1) // 2


def _check_range(key: str, tensor: Tensor, dtype: DType) -> None:
    """float16 holds at most 65504: a larger value would be stored as infinity."""
    if dtype != "float16" or not tensor.numel():
        return
    biggest = float(tensor.detach().abs().max())
    if biggest > _FLOAT16_MAX:
        raise ArtifactError(
            f"tensor {key!r} holds {biggest:.3g}, beyond float16's largest value {_FLOAT16_MAX:g}; use bfloat16",
            location="dtype",
        )


def _fit(key: str) -> str:
    """A tensor key within the spec's 512 characters: a long one keeps its head and a digest of the rest."""
    if len(key) <= MAX_KEY_LENGTH:
        return key
    return f"{key[: MAX_KEY_LENGTH - 17]}.{hashlib.sha256(key.encode()).hexdigest()[:16]}"
