"""Curvature blocks: precision matrices of one parameter (or one LoRA A/B pair), never materialised.

``quad`` also accepts stacked deltas for stacked blocks (a leading batch dimension) and sums over
it; ``dense``, ``scale``, ``+`` and ``project_lora`` are for single blocks.

Conventions (SPEC.md §5): a parameter ``Δ`` of shape ``(d_out, d_in)`` is vectorised row-major,
so a Kronecker block with input factor ``Σx`` (``d_in × d_in``) and output factor ``Σg``
(``d_out × d_out``) is ``P = Σg ⊗ Σx`` and ``vec(Δ)ᵀ P vec(Δ) = tr(Σg Δ Σx Δᵀ)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from laplace_hub.curvature.factors import DenseFactor, EigenFactor, Factor
from laplace_hub.errors import StructureError

Device = torch.device | str | None


class Block(ABC):
    """A PSD precision over one or more matrix parameters, evaluated through ``quad``."""

    @abstractmethod
    def quad(self, *deltas: Tensor) -> Tensor:
        """``vec(Δ)ᵀ P vec(Δ)`` for the block's parameter(s), differentiable in the deltas."""

    @abstractmethod
    def dense(self) -> Tensor:
        """``P`` as a dense matrix over the row-major vec of the parameter(s), for tests."""

    @abstractmethod
    def scale(self, c: float) -> Block:
        """``c · P``."""

    @abstractmethod
    def to(self, device: Device = None, dtype: torch.dtype | None = None) -> Block:
        """The same block on another device or dtype."""

    def __add__(self, other: Block) -> Block:
        return BlockSum((self, other))


class WeightBlock(Block):
    """A precision over one matrix ``Δ: d_out × d_in``, which can be projected onto LoRA factors."""

    shape: tuple[int, int]

    def quad_lowrank(self, b: Tensor, a: Tensor) -> Tensor:
        """The quadratic form at ``Δ = b @ a``; subclasses avoid forming ``Δ`` when they can."""
        return self.quad(b @ a)

    @abstractmethod
    def project_lora(self, a: Tensor, b: Tensor, scaling: float, cross: bool = False) -> LoraPairBlock:
        """The Gauss-Newton projection ``Jᵀ P J`` onto LoRA factors at ``(a, b)``, ``Δ = s·b·a``.

        Kronecker blocks project exactly (with ``cross=True`` the A–B cross block is kept, as in
        B-Tri-K-FAC); a diagonal block projects to the diagonal of ``Jᵀ P J``.
        """

    def _check(self, delta: Tensor) -> None:
        if tuple(delta.shape[-2:]) != self.shape:
            raise StructureError(f"delta has shape {tuple(delta.shape)}, block covers {self.shape}")


@dataclass(frozen=True)
class DiagBlock(WeightBlock):
    """``P = diag(vec(D))`` with ``D`` of the parameter's shape."""

    diagonal: Tensor

    @property
    def shape(self) -> tuple[int, int]:  # type: ignore[override]
        return (int(self.diagonal.shape[-2]), int(self.diagonal.shape[-1]))

    def quad(self, *deltas: Tensor) -> Tensor:
        (delta,) = deltas
        self._check(delta)
        return (self.diagonal * delta.square()).sum()

    def quad_lowrank(self, b: Tensor, a: Tensor) -> Tensor:
        if self.diagonal.dim() == 2:
            return self.quad(b @ a)
        # Stacked: form one Δ at a time, so that memory stays that of one module.
        return torch.stack(
            [(d * (bi @ ai).square()).sum() for d, bi, ai in zip(self.diagonal, b, a, strict=True)]
        ).sum()

    def dense(self) -> Tensor:
        return torch.diag(self.diagonal.reshape(-1))

    def scale(self, c: float) -> DiagBlock:
        return DiagBlock(self.diagonal * c)

    def to(self, device: Device = None, dtype: torch.dtype | None = None) -> DiagBlock:
        return DiagBlock(self.diagonal.to(device=device, dtype=dtype))

    def __add__(self, other: Block) -> Block:
        if isinstance(other, DiagLowRankBlock) and other.shape == self.shape:
            return other + self
        if isinstance(other, DiagBlock) and other.shape == self.shape:
            return DiagBlock(self.diagonal + other.diagonal)
        return super().__add__(other)

    def project_lora(self, a: Tensor, b: Tensor, scaling: float, cross: bool = False) -> LoraPairBlock:
        if cross:
            raise StructureError("a diagonal block has no A–B cross block; use a kron block")
        s2 = scaling**2
        return LoraPairBlock(DiagBlock(s2 * b.square().T @ self.diagonal), DiagBlock(s2 * self.diagonal @ a.square().T))


@dataclass(frozen=True)
class DiagLowRankBlock(WeightBlock):
    """``P = diag(vec D) + Σⱼ vec(Uⱼ) vec(Uⱼ)ᵀ``: a diagonal plus ``k`` rank-one directions.

    ``lowrank`` is ``U`` of shape ``(k, d_out, d_in)``: each direction has the parameter's shape,
    so ``⟨Uⱼ, Δ⟩`` needs no reshaping and a sum of two such blocks is exact (stack the ``U``s).
    """

    diagonal: Tensor
    lowrank: Tensor

    @property
    def shape(self) -> tuple[int, int]:  # type: ignore[override]
        return (int(self.diagonal.shape[-2]), int(self.diagonal.shape[-1]))

    @property
    def rank(self) -> int:
        return int(self.lowrank.shape[-3])

    def quad(self, *deltas: Tensor) -> Tensor:
        (delta,) = deltas
        self._check(delta)
        along = (self.lowrank * delta.unsqueeze(-3)).sum((-2, -1))
        return (self.diagonal * delta.square()).sum() + along.square().sum()

    def quad_lowrank(self, b: Tensor, a: Tensor) -> Tensor:
        # ⟨Uⱼ, B A⟩ = ⟨Uⱼ Aᵀ, B⟩: O(k·d_out·d_in·r), and Δ only as the diagonal part forms it.
        along = ((self.lowrank @ a.mT.unsqueeze(-3)) * b.unsqueeze(-3)).sum((-2, -1))
        return DiagBlock(self.diagonal).quad_lowrank(b, a) + along.square().sum()

    def dense(self) -> Tensor:
        directions = self.lowrank.reshape(self.rank, -1)
        return torch.diag(self.diagonal.reshape(-1)) + directions.T @ directions

    def scale(self, c: float) -> DiagLowRankBlock:
        return DiagLowRankBlock(self.diagonal * c, self.lowrank * c**0.5)

    def to(self, device: Device = None, dtype: torch.dtype | None = None) -> DiagLowRankBlock:
        return DiagLowRankBlock(
            self.diagonal.to(device=device, dtype=dtype), self.lowrank.to(device=device, dtype=dtype)
        )

    def __add__(self, other: Block) -> Block:
        if isinstance(other, DiagBlock) and other.shape == self.shape:
            return DiagLowRankBlock(self.diagonal + other.diagonal, self.lowrank)
        if isinstance(other, DiagLowRankBlock) and other.shape == self.shape:
            return DiagLowRankBlock(self.diagonal + other.diagonal, torch.cat([self.lowrank, other.lowrank], -3))
        return super().__add__(other)

    def project_lora(self, a: Tensor, b: Tensor, scaling: float, cross: bool = False) -> LoraPairBlock:
        """The low-rank part projects exactly (``s Bᵀ Uⱼ`` and ``s Uⱼ Aᵀ``), the diagonal as a diag block does."""
        if cross:
            raise StructureError("a diag_lowrank block stores no A–B cross block; use a kron block")
        diag = DiagBlock(self.diagonal).project_lora(a, b, scaling)
        return LoraPairBlock(
            DiagLowRankBlock(diag.a.diagonal, scaling * b.T @ self.lowrank),  # type: ignore[attr-defined]
            DiagLowRankBlock(diag.b.diagonal, scaling * self.lowrank @ a.T),  # type: ignore[attr-defined]
        )


@dataclass(frozen=True)
class KronBlock(WeightBlock):
    """``P = Σg ⊗ Σx``: ``output`` is ``Σg`` (``d_out²``), ``input`` is ``Σx`` (``d_in²``)."""

    input: Factor
    output: Factor

    @property
    def shape(self) -> tuple[int, int]:  # type: ignore[override]
        return (self.output.dim, self.input.dim)

    @property
    def structure(self) -> str:
        """``kron_eig`` when both factors are eigen-truncated, else ``kron``."""
        eig = isinstance(self.input, EigenFactor) and isinstance(self.output, EigenFactor)
        return "kron_eig" if eig else "kron"

    def quad(self, *deltas: Tensor) -> Tensor:
        (delta,) = deltas
        self._check(delta)
        if self.input.constant and self.output.constant:
            return _KronQuad.apply(delta, self.input, self.output)
        return (self.output.apply(delta.mT).mT * self.input.apply(delta)).sum()

    def quad_lowrank(self, b: Tensor, a: Tensor) -> Tensor:
        # tr(Σg B A Σx Aᵀ Bᵀ) = <Bᵀ Σg B, A Σx Aᵀ>: O(r (d_in² + d_out²)), no d_out × d_in matrix.
        return (self.output.sandwich(b.mT) * self.input.sandwich(a)).sum()

    def dense(self) -> Tensor:
        return torch.kron(self.output.dense(), self.input.dense())

    def scale(self, c: float) -> KronBlock:
        return KronBlock(self.input, self.output.scale(c))

    def to(self, device: Device = None, dtype: torch.dtype | None = None) -> KronBlock:
        return KronBlock(self.input.to(device, dtype), self.output.to(device, dtype))

    def compress(self, rank: int) -> KronBlock:
        """Both factors truncated to their top ``rank`` eigenpairs (``kron_eig``)."""
        return KronBlock(self.input.compress(rank), self.output.compress(rank))

    def project_lora(self, a: Tensor, b: Tensor, scaling: float, cross: bool = False) -> LoraPairBlock:
        s2 = scaling**2
        block_a = KronBlock(self.input, DenseFactor(s2 * self.output.sandwich(b.T)))
        block_b = KronBlock(DenseFactor(self.input.sandwich(a)), self.output.scale(s2))
        if not cross:
            return LoraPairBlock(block_a, block_b)
        cross_input = self.input.apply(a).T.contiguous()
        cross_output = s2 * self.output.apply(b.T)
        return LoraPairBlock(block_a, block_b, cross_input, cross_output)


class _KronQuad(torch.autograd.Function):
    """``⟨Σg Δ, Δ Σx⟩`` whose backward reuses the forward's products.

    The gradient ``2 Σg Δ Σx`` is one more product with the *smaller* factor applied to what the
    forward already computed; autograd's generic path would multiply by both factors again.
    For a LoRA ``A`` (``Σg`` is ``r × r``) that removes the only ``r·d²`` product of the backward.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, delta: Tensor, input: Factor, output: Factor) -> Tensor:
        left = output.apply(delta.mT).mT  # Σg Δ
        right = input.apply(delta)  # Δ Σx
        ctx.save_for_backward(left, right)
        ctx.factors = (input, output)  # type: ignore[attr-defined]
        return (left * right).sum()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None, None]:
        left, right = ctx.saved_tensors  # type: ignore[attr-defined]
        input, output = ctx.factors  # type: ignore[attr-defined]
        both = output.apply(right.mT).mT if output.dim <= input.dim else input.apply(left)
        return 2 * grad * both, None, None


@dataclass(frozen=True)
class LoraPairBlock(Block):
    """A precision over a LoRA pair ``(δA: r × d_in, δB: d_out × r)``.

    Block-diagonal (``a``, ``b``) unless the Kronecker cross block ``R ⊗ L`` is given, with
    ``L = cross_input`` (``d_in × r``) and ``R = cross_output`` (``r × d_out``): then
    ``quad = a(δA) + b(δB) + 2 tr(δAᵀ R δB Lᵀ)`` — the paper's eq. (10).
    """

    a: WeightBlock
    b: WeightBlock
    cross_input: Tensor | None = None
    cross_output: Tensor | None = None

    def quad(self, *deltas: Tensor) -> Tensor:
        delta_a, delta_b = deltas
        total = self.a.quad(delta_a) + self.b.quad(delta_b)
        if self.cross_input is not None and self.cross_output is not None:
            total = total + 2 * (delta_a * (self.cross_output @ delta_b @ self.cross_input.mT)).sum()
        return total

    def dense(self) -> Tensor:
        pa, pb = self.a.dense(), self.b.dense()
        if self.cross_input is None or self.cross_output is None:
            return torch.block_diag(pa, pb)
        cross = torch.kron(self.cross_output.contiguous(), self.cross_input.contiguous())
        return torch.cat([torch.cat([pa, cross], 1), torch.cat([cross.T, pb], 1)], 0)

    def scale(self, c: float) -> LoraPairBlock:
        cross_output = None if self.cross_output is None else self.cross_output * c
        return LoraPairBlock(self.a.scale(c), self.b.scale(c), self.cross_input, cross_output)  # type: ignore[arg-type]

    def to(self, device: Device = None, dtype: torch.dtype | None = None) -> LoraPairBlock:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        return LoraPairBlock(
            self.a.to(device, dtype),  # type: ignore[arg-type]
            self.b.to(device, dtype),  # type: ignore[arg-type]
            move(self.cross_input),
            move(self.cross_output),
        )


@dataclass(frozen=True)
class BlockSum(Block):
    """``Σ_i P_i``: what adding blocks that have no closed-form sum gives (e.g. two Kroneckers)."""

    terms: tuple[Block, ...]

    def quad(self, *deltas: Tensor) -> Tensor:
        return torch.stack([term.quad(*deltas) for term in self.terms]).sum()

    def quad_lowrank(self, b: Tensor, a: Tensor) -> Tensor:
        return torch.stack([term.quad_lowrank(b, a) for term in self.terms]).sum()  # type: ignore[attr-defined]

    def dense(self) -> Tensor:
        return torch.stack([term.dense() for term in self.terms]).sum(0)

    def scale(self, c: float) -> BlockSum:
        return BlockSum(tuple(term.scale(c) for term in self.terms))

    def to(self, device: Device = None, dtype: torch.dtype | None = None) -> BlockSum:
        return BlockSum(tuple(term.to(device, dtype) for term in self.terms))

    def __add__(self, other: Block) -> Block:
        more = other.terms if isinstance(other, BlockSum) else (other,)
        return BlockSum(self.terms + more)

    def project_lora(self, a: Tensor, b: Tensor, scaling: float, cross: bool = False) -> Block:
        """Projection is linear in ``P``: project every term."""
        return BlockSum(tuple(t.project_lora(a, b, scaling, cross) for t in self.terms))  # type: ignore[attr-defined]
