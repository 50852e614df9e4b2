"""Symmetric PSD Kronecker factors, dense or eigen-truncated, behind one small interface.

A block never looks inside a factor: it asks for ``F`` applied to a matrix, sandwiched between a
matrix and its transpose, or made dense. That is what lets ``kron`` and ``kron_eig`` share code.
Every operation also works on a stack of factors (a leading batch dimension), which is how many
modules of one shape are evaluated in a few kernels (:mod:`laplace_hub.curvature.stack`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from laplace_hub.errors import StructureError


class Factor(ABC):
    """A symmetric PSD ``n × n`` matrix ``F``."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """The side ``n`` of ``F``."""

    @abstractmethod
    def dense(self) -> Tensor:
        """``F`` as a dense matrix."""

    @abstractmethod
    def apply(self, m: Tensor) -> Tensor:
        """``m @ F`` for ``m`` of shape ``(k, n)``."""

    @abstractmethod
    def sandwich(self, m: Tensor) -> Tensor:
        """``m @ F @ mᵀ`` for ``m`` of shape ``(k, n)``, computed without forming ``F``."""

    @property
    @abstractmethod
    def constant(self) -> bool:
        """True when no tensor of ``F`` requires grad (then cheaper custom backwards apply)."""

    @abstractmethod
    def scale(self, c: float) -> Factor:
        """``c · F``."""

    @abstractmethod
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Factor:
        """The same factor on another device or dtype."""

    def __add__(self, other: Factor) -> Factor:
        _check_same_dim(self, other)
        return DenseFactor(self.dense() + other.dense())

    def compress(self, rank: int) -> EigenFactor:
        """Keep the top ``rank`` eigenpairs; the others collapse to their mean (the tail)."""
        if rank < 1:
            raise StructureError(f"eigen rank must be >= 1, got {rank}")
        values, vectors = torch.linalg.eigh(self.dense())
        values = values.clamp_min(0)
        keep = min(rank, self.dim)
        tail = values[: self.dim - keep].mean().item() if keep < self.dim else 0.0
        return EigenFactor(vectors[:, -keep:].flip(-1), values[-keep:].flip(-1), tail)


def _check_same_dim(a: Factor, b: Factor) -> None:
    if a.dim != b.dim:
        raise StructureError(f"cannot add factors of size {a.dim} and {b.dim}")


@dataclass(frozen=True)
class DenseFactor(Factor):
    """``F`` stored in full."""

    matrix: Tensor

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[-1])

    @property
    def constant(self) -> bool:
        return not self.matrix.requires_grad

    def dense(self) -> Tensor:
        return self.matrix

    def apply(self, m: Tensor) -> Tensor:
        return m @ self.matrix

    def sandwich(self, m: Tensor) -> Tensor:
        if not self.constant:
            return (m @ self.matrix) @ m.mT
        return _SymmetricSandwich.apply(m, self.matrix)

    def scale(self, c: float) -> DenseFactor:
        return DenseFactor(self.matrix * c)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> DenseFactor:
        return DenseFactor(self.matrix.to(device=device, dtype=dtype))


@dataclass(frozen=True)
class EigenFactor(Factor):
    """``F = V diag(λ) Vᵀ + tail · (I − V Vᵀ)`` with orthonormal ``V: n × k``.

    ``tail`` is a float, or a tensor of the batch shape when factors are stacked.
    """

    eigenvectors: Tensor
    eigenvalues: Tensor
    tail: float | Tensor

    @property
    def dim(self) -> int:
        return int(self.eigenvectors.shape[-2])

    @property
    def constant(self) -> bool:
        return not (self.eigenvectors.requires_grad or self.eigenvalues.requires_grad)

    def _tail(self) -> Tensor:
        """The tail with two trailing unit dimensions, to scale matrices."""
        tail = torch.as_tensor(self.tail, dtype=self.eigenvalues.dtype, device=self.eigenvalues.device)
        return tail[..., None, None]

    def _shifted(self) -> Tensor:
        """``λ − tail`` as a row (…, 1, k), to scale the columns of ``V``."""
        return self.eigenvalues[..., None, :] - self._tail()

    def dense(self) -> Tensor:
        v = self.eigenvectors
        eye = torch.eye(self.dim, dtype=v.dtype, device=v.device)
        return (v * self._shifted()) @ v.mT + self._tail() * eye

    def apply(self, m: Tensor) -> Tensor:
        v = self.eigenvectors
        return ((m @ v) * self._shifted()) @ v.mT + self._tail() * m

    def sandwich(self, m: Tensor) -> Tensor:
        mv = m @ self.eigenvectors
        return (mv * self._shifted()) @ mv.mT + self._tail() * (m @ m.mT)

    def scale(self, c: float) -> EigenFactor:
        return EigenFactor(self.eigenvectors, self.eigenvalues * c, self.tail * c)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> EigenFactor:
        tail = self.tail.to(device=device, dtype=dtype) if isinstance(self.tail, Tensor) else self.tail
        return EigenFactor(
            self.eigenvectors.to(device=device, dtype=dtype), self.eigenvalues.to(device=device, dtype=dtype), tail
        )


class _SymmetricSandwich(torch.autograd.Function):
    """``m F mᵀ`` for a constant symmetric ``F``: the backward reuses ``m F`` from the forward.

    Autograd's generic path multiplies by ``F`` again in the backward (``r·n²`` flops);
    with ``F`` symmetric, ``∂⟨G, m F mᵀ⟩/∂m = (G + Gᵀ) m F`` needs only ``r²·n``. This halves the
    cost of the weight-space Kronecker penalty.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, m: Tensor, matrix: Tensor) -> Tensor:
        mf = m @ matrix
        ctx.save_for_backward(mf)
        return mf @ m.mT

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        (mf,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return (grad + grad.mT) @ mf, None


def pack_symmetric(matrix: Tensor) -> Tensor:
    """The upper triangle of a symmetric ``n × n`` matrix, row by row: ``n(n+1)/2`` values."""
    rows, cols = torch.triu_indices(matrix.shape[0], matrix.shape[0], device=matrix.device)
    return matrix[rows, cols]


def unpack_symmetric(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_symmetric`."""
    if packed.shape != (n * (n + 1) // 2,):
        raise StructureError(f"packed factor has {tuple(packed.shape)} values, expected {n * (n + 1) // 2}")
    rows, cols = torch.triu_indices(n, n, device=packed.device)
    matrix = packed.new_zeros((n, n))
    matrix[rows, cols] = packed
    matrix[cols, rows] = packed
    return matrix
