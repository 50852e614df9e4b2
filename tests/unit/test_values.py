"""The value rules of spec 1.2 (SPEC.md §8.2–8.3) against dense eigen-decompositions in float64."""

from __future__ import annotations

import pytest
import torch

from laplace_hub.artifact.findings import Report
from laplace_hub.artifact.values import (
    TOLERANCE,
    check_tensor,
    cross_norm,
    psd_for_storage,
    psd_with_margin,
    ridged,
)
from laplace_hub.curvature import DenseFactor, KronBlock, LoraPairBlock
from laplace_hub.manifest import TensorSpec

GEN = torch.Generator().manual_seed(0)


def _psd(n: int, rank: int | None = None) -> torch.Tensor:
    m = torch.randn(n, rank or n + 1, generator=GEN, dtype=torch.float64)
    return m @ m.T


def _spec(role: str, dtype: str = "float32") -> TensorSpec:
    return TensorSpec((0,), dtype, role, "modules.m.blocks.0", "m")  # type: ignore[arg-type]


def _codes(tensor: torch.Tensor, role: str, dtype: str = "float32") -> list[str]:
    report = Report("x")
    check_tensor(report, "k", tensor, _spec(role, dtype))
    return [f.code for f in report.findings]


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_a_rank_deficient_factor_rounded_and_mended_passes_and_decodes_positive_definite(dtype: str) -> None:
    """Rounding a singular PSD matrix makes it indefinite; the writer mends it, the ridge makes it PD."""
    exact = _psd(12, rank=3)
    torch_dtype = getattr(torch, dtype)
    stored = psd_for_storage(exact, torch_dtype, dtype)
    assert stored.dtype == torch_dtype
    assert _codes(stored, "factor", dtype) == []
    decoded = ridged(stored.double(), dtype)
    assert torch.linalg.eigvalsh(decoded)[0] > 0
    # the mend is no larger than the rounding it repairs (a few τ of the norm)
    shift = (stored.double() - exact).diagonal().mean().abs()
    assert shift <= 4 * TOLERANCE[dtype] * torch.linalg.matrix_norm(exact)


def test_the_margin_separates_what_the_ridge_can_and_cannot_repair() -> None:
    matrix = _psd(8)
    lowest = torch.linalg.eigvalsh(matrix)[0]
    norm = torch.linalg.matrix_norm(matrix)
    tol = TOLERANCE["float32"]
    inside = matrix - (lowest + 0.4 * tol * norm) * torch.eye(8, dtype=torch.float64)  # λ_min = −0.4 τ‖·‖
    outside = matrix - (lowest + 0.6 * tol * norm) * torch.eye(8, dtype=torch.float64)  # λ_min = −0.6 τ‖·‖
    assert psd_with_margin(inside, tol / 2) and not psd_with_margin(outside, tol / 2)
    assert _codes(inside, "factor") == [] and _codes(outside, "factor") == ["value.not_psd"]
    assert torch.linalg.eigvalsh(ridged(inside, "float32"))[0] > 0


@pytest.mark.parametrize(
    ("tensor", "role", "code"),
    [
        (torch.tensor([3.0, 1.0, 2.0]), "eigenvalues", "value.eigen_order"),
        (torch.tensor([2.0**41, 1.0]), "eigenvalues", "value.range"),
        (torch.tensor([1.0, float("nan")]), "diagonal", "value.non_finite"),
        (torch.tensor([1.0, -1e-30]), "diagonal", "value.negative"),
        (1.5 * torch.eye(4, 2), "eigenvectors", "value.not_orthonormal"),
    ],
)
def test_each_rule_has_its_code(tensor: torch.Tensor, role: str, code: str) -> None:
    assert _codes(tensor, role) == [code]


def test_orthonormal_bases_pass_within_rounding() -> None:
    q, _ = torch.linalg.qr(torch.randn(64, 8, generator=GEN, dtype=torch.float64))
    assert _codes(q.float(), "eigenvectors") == []
    assert _codes(q.bfloat16(), "eigenvectors", "bfloat16") == []


def _tridiag(scale: float) -> tuple[LoraPairBlock, float]:
    """A B-Tri-K-FAC block projected from a PSD Kronecker block, its cross block scaled."""
    d_out, d_in, r = 5, 4, 2
    weight = KronBlock(DenseFactor(_psd(d_in)), DenseFactor(_psd(d_out)))
    a = torch.randn(r, d_in, generator=GEN, dtype=torch.float64)
    b = torch.randn(d_out, r, generator=GEN, dtype=torch.float64)
    pair = weight.project_lora(a, b, 0.7, cross=True)
    assert pair.cross_input is not None and pair.cross_output is not None
    block = LoraPairBlock(pair.a, pair.b, pair.cross_input, scale * pair.cross_output)
    ridge = {
        name: ridged(f.dense(), "float64")
        for name, f in (("ai", block.a.input), ("ao", block.a.output), ("bi", block.b.input), ("bo", block.b.output))  # type: ignore[attr-defined]
    }
    norm = cross_norm(ridge["ai"], ridge["ao"], ridge["bi"], ridge["bo"], block.cross_input, block.cross_output)  # type: ignore[arg-type]
    ridged_block = LoraPairBlock(
        KronBlock(DenseFactor(ridge["ai"]), DenseFactor(ridge["ao"])),
        KronBlock(DenseFactor(ridge["bi"]), DenseFactor(ridge["bo"])),
        block.cross_input,
        block.cross_output,
    )
    return ridged_block, norm


@pytest.mark.parametrize("scale", [0.5, 1.0, 1.02, 10.0])
def test_cross_norm_at_most_one_is_exactly_positive_semidefinite(scale: float) -> None:
    """The Kronecker Schur test agrees with the dense eigenvalues of the whole LoRA-pair block."""
    block, norm = _tridiag(scale)
    lowest = torch.linalg.eigvalsh(block.dense())[0].item()
    biggest = torch.linalg.eigvalsh(block.dense())[-1].item()
    assert (norm <= 1 + 1e-9) == (lowest >= -1e-9 * biggest)
    if scale == 1.0:  # a projection of a PSD block sits at the boundary, the ridge just inside it
        assert 0.99 < norm <= 1.0
