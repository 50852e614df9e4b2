"""The value rules and the decode of spec 1.3 (SPEC.md §8.2–8.3) against dense eigen-decompositions in float64."""

from __future__ import annotations

import pytest
import torch

from laplace_hub.artifact.findings import Report
from laplace_hub.artifact.values import (
    TOLERANCE,
    check_tensor,
    cross_norm,
    psd_for_storage,
    psd_part,
    psd_with_margin,
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


def _clipped(matrix: torch.Tensor) -> torch.Tensor:
    """The brute-force PSD part: the symmetric part's eigendecomposition with negative eigenvalues set to 0."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return vectors @ torch.diag(values.clamp_min(0)) @ vectors.T


def test_psd_part_keeps_a_positive_definite_factor_and_drops_its_antisymmetric_part() -> None:
    """The decode of a PD symmetric part is that symmetric part, to the last bit: nothing is added."""
    exact = _psd(16)
    skew = torch.randn(16, 16, generator=GEN, dtype=torch.float64)
    stored = exact + 1e-3 * (skew - skew.T)
    assert torch.equal(psd_part(stored), (stored + stored.T) * 0.5)


@pytest.mark.parametrize("seed", range(4))
def test_psd_part_is_the_nearest_positive_semidefinite_matrix(seed: int) -> None:
    """For an indefinite ``S``: the brute-force clip, and no PSD matrix is nearer (Frobenius)."""
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(10, 10, generator=gen, dtype=torch.float64)
    stored = m + m.T
    decoded = psd_part(stored)
    torch.testing.assert_close(decoded, _clipped(stored), rtol=0, atol=1e-12)
    assert torch.linalg.eigvalsh(decoded)[0] >= -1e-12 * torch.linalg.matrix_norm(stored)
    distance = torch.linalg.matrix_norm(decoded - stored)
    for _ in range(20):
        other = torch.randn(10, 12, generator=gen, dtype=torch.float64)
        assert torch.linalg.matrix_norm(other @ other.T - stored) >= distance


def test_an_antisymmetric_part_at_the_symmetry_margin_cannot_make_a_penalty_negative() -> None:
    """Issue 20's finding: ``F = I + A``, ``A`` antisymmetric at the bf16 margin, gave a penalty of −4.92 at ‖Δ‖ = 1.

    With ``A = ε(s tᵀ − t sᵀ)`` (``s, t`` random signs) ``‖A‖₂ ≈ nε``, and ``tr(FΔFΔᵀ)`` of the raw numbers
    is ``1 − ‖A‖₂²`` at ``Δ ∝ a aᵀ + b bᵀ`` (``a, b`` its singular vectors). The decode keeps ``S = I``.
    """
    n = 512
    s, t = (torch.randint(0, 2, (n, 1), generator=GEN).double() * 2 - 1 for _ in range(2))
    factor = (torch.eye(n, dtype=torch.float64) + 0.004 * (s @ t.T - t @ s.T)).bfloat16()
    assert _codes(factor, "factor", "bfloat16") == []  # within the symmetry rule
    raw = factor.double()
    u, _, vh = torch.linalg.svd((raw - raw.T) / 2)
    delta = u[:, :1] @ u[:, :1].T + vh[:1].T @ vh[:1]
    delta = delta / torch.linalg.matrix_norm(delta)
    assert torch.trace(raw @ delta @ raw @ delta.T).item() < -3  # what a reader of the raw numbers computes
    block = KronBlock(DenseFactor(psd_part(factor).double()), DenseFactor(psd_part(factor).double()))
    symmetric = (raw + raw.T) / 2
    assert torch.equal(symmetric, torch.eye(n, dtype=torch.float64))
    assert block.quad(delta).item() == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_a_rank_deficient_factor_is_stored_as_rounded_and_decoded_by_the_least_change(dtype: str) -> None:
    """Rounding a singular PSD matrix makes it indefinite; the writer stores the rounding, readers clip it."""
    exact = _psd(12, rank=3)
    torch_dtype = getattr(torch, dtype)
    stored = psd_for_storage(exact, torch_dtype, dtype)
    assert torch.equal(stored, exact.to(torch_dtype))  # rounding alone stays within the rule: nothing added
    assert _codes(stored, "factor", dtype) == []
    symmetric = stored.double()
    decoded = psd_part(symmetric)
    lowest = torch.linalg.eigvalsh(symmetric)[0].item()
    assert torch.linalg.eigvalsh(decoded)[0] >= -1e-12 * torch.linalg.matrix_norm(exact)
    # the change is exactly the negative eigenvalues: at most |λ_min| in the spectral norm
    change = torch.linalg.matrix_norm(decoded - symmetric, ord=2).item()
    assert change == pytest.approx(max(0.0, -lowest), rel=1e-6, abs=1e-12)


def test_a_factor_indefinite_before_rounding_is_stored_as_its_psd_part() -> None:
    matrix = _psd(8)
    matrix = matrix - 1.01 * torch.linalg.eigvalsh(matrix)[0] * torch.eye(8, dtype=torch.float64)
    stored = psd_for_storage(matrix, torch.float32, "float32")
    torch.testing.assert_close(stored.double(), _clipped(matrix), rtol=1e-6, atol=1e-6)
    assert _codes(stored, "factor") == []


def test_the_margin_separates_what_rounding_can_and_cannot_explain() -> None:
    matrix = _psd(8)
    lowest = torch.linalg.eigvalsh(matrix)[0]
    norm = torch.linalg.matrix_norm(matrix)
    tol = TOLERANCE["float32"]
    inside = matrix - (lowest + 0.4 * tol * norm) * torch.eye(8, dtype=torch.float64)  # λ_min = −0.4 τ‖·‖
    outside = matrix - (lowest + 0.6 * tol * norm) * torch.eye(8, dtype=torch.float64)  # λ_min = −0.6 τ‖·‖
    assert psd_with_margin(inside, tol / 2) and not psd_with_margin(outside, tol / 2)
    assert _codes(inside, "factor") == [] and _codes(outside, "factor") == ["value.not_psd"]
    assert torch.linalg.eigvalsh(psd_part(inside))[0] >= -1e-12 * norm


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
    decoded = {
        name: psd_part(f.dense())
        for name, f in (("ai", block.a.input), ("ao", block.a.output), ("bi", block.b.input), ("bo", block.b.output))  # type: ignore[attr-defined]
    }
    d = decoded
    norm = cross_norm(d["ai"], d["ao"], d["bi"], d["bo"], block.cross_input, block.cross_output)  # type: ignore[arg-type]
    decoded_block = LoraPairBlock(
        KronBlock(DenseFactor(d["ai"]), DenseFactor(d["ao"])),
        KronBlock(DenseFactor(d["bi"]), DenseFactor(d["bo"])),
        block.cross_input,
        block.cross_output,
    )
    return decoded_block, norm


@pytest.mark.parametrize("scale", [0.5, 1.0, 1.02, 10.0])
def test_cross_norm_at_most_one_is_exactly_positive_semidefinite(scale: float) -> None:
    """The Kronecker Schur test agrees with the dense eigenvalues of the whole LoRA-pair block."""
    block, norm = _tridiag(scale)
    lowest = torch.linalg.eigvalsh(block.dense())[0].item()
    biggest = torch.linalg.eigvalsh(block.dense())[-1].item()
    assert (norm <= 1 + 1e-9) == (lowest >= -1e-9 * biggest)
    if scale == 1.0:  # a projection of a PSD block sits at the boundary
        assert norm == pytest.approx(1.0, abs=1e-9)
