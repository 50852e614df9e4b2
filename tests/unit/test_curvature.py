"""Every block operation against the dense matrix it stands for, in float64."""

from __future__ import annotations

import pytest
import torch
from torch.func import jacrev

from laplace_hub.curvature import (
    BlockSum,
    DenseFactor,
    DiagBlock,
    DiagLowRankBlock,
    EigenFactor,
    KronBlock,
    LoraPairBlock,
    pack_symmetric,
    unpack_symmetric,
)
from laplace_hub.errors import StructureError

D_OUT, D_IN, RANK = 5, 4, 2


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def psd(n: int, seed: int, rank: int | None = None) -> torch.Tensor:
    m = torch.randn(n, rank or n + 2, generator=torch.Generator().manual_seed(seed))
    return m @ m.T


def vec(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)  # row-major, as SPEC.md §5 says


def diag_lowrank(seed: int, k: int = 3) -> DiagLowRankBlock:
    gen = torch.Generator().manual_seed(seed)
    return DiagLowRankBlock(torch.rand(D_OUT, D_IN, generator=gen), torch.randn(k, D_OUT, D_IN, generator=gen))


def weight_blocks() -> dict[str, object]:
    kron = KronBlock(DenseFactor(psd(D_IN, 1)), DenseFactor(psd(D_OUT, 2)))
    return {
        "diag": DiagBlock(torch.rand(D_OUT, D_IN, generator=torch.Generator().manual_seed(3))),
        "diag_lowrank": diag_lowrank(4),
        "kron": kron,
        "kron_eig": kron.compress(2),
        "kron_eig_full": kron.compress(10),
    }


@pytest.fixture(params=list(weight_blocks()))
def block(request: pytest.FixtureRequest):
    return weight_blocks()[request.param]


def test_quad_and_gradient_match_dense(block) -> None:
    delta = torch.randn(D_OUT, D_IN, requires_grad=True)
    dense = block.dense()
    expected = vec(delta) @ dense @ vec(delta)
    got = block.quad(delta)
    torch.testing.assert_close(got, expected)
    (g_got,) = torch.autograd.grad(got, delta)
    (g_exp,) = torch.autograd.grad(expected, delta)
    torch.testing.assert_close(g_got, g_exp)


def test_quad_lowrank_matches_materialised_delta(block) -> None:
    b, a = torch.randn(D_OUT, RANK), torch.randn(RANK, D_IN)
    torch.testing.assert_close(block.quad_lowrank(b, a), vec(b @ a) @ block.dense() @ vec(b @ a))


def test_kron_dense_is_output_kron_input() -> None:
    x, g = psd(D_IN, 1), psd(D_OUT, 2)
    torch.testing.assert_close(KronBlock(DenseFactor(x), DenseFactor(g)).dense(), torch.kron(g, x))


def test_scale_and_add_match_dense(block) -> None:
    other = weight_blocks()["kron"]
    torch.testing.assert_close(block.scale(0.3).dense(), 0.3 * block.dense())
    torch.testing.assert_close((block + other).dense(), block.dense() + other.dense())
    delta = torch.randn(D_OUT, D_IN)
    torch.testing.assert_close((block + other).quad(delta), block.quad(delta) + other.quad(delta))


def test_diag_plus_diag_stays_diag() -> None:
    d = weight_blocks()["diag"]
    assert isinstance(d + d, DiagBlock)
    assert isinstance(weight_blocks()["kron"] + d, BlockSum)


def test_diag_lowrank_sums_stay_exact_and_in_structure() -> None:
    """D + UUᵀ plus a diagonal or another D' + U'U'ᵀ is again diagonal plus low rank (ranks add)."""
    d, dl, other = weight_blocks()["diag"], diag_lowrank(4, k=3), diag_lowrank(5, k=2)
    for total, parts in ((dl + d, (dl, d)), (d + dl, (d, dl)), (dl + other, (dl, other))):
        assert isinstance(total, DiagLowRankBlock)
        torch.testing.assert_close(total.dense(), sum(p.dense() for p in parts))
    assert (dl + other).rank == 5


def test_diag_lowrank_dense_is_diagonal_plus_outer_products() -> None:
    dl = diag_lowrank(4)
    expected = torch.diag(vec(dl.diagonal)) + sum(torch.outer(vec(u), vec(u)) for u in dl.lowrank)
    torch.testing.assert_close(dl.dense(), expected)


def test_diag_lowrank_projection_is_exact_for_the_low_rank_part() -> None:
    """Jᵀ(D + UUᵀ)J per factor: the UUᵀ part exactly, the D part by its diagonal (as diag does)."""
    dl = diag_lowrank(4)
    a, b, s = torch.randn(RANK, D_IN), torch.randn(D_OUT, RANK), 0.7
    jac_a, jac_b = jacrev(lambda a_, b_: vec(s * b_ @ a_), argnums=(0, 1))(a, b)
    pair = dl.project_lora(a, b, s)
    low = DiagLowRankBlock(torch.zeros(D_OUT, D_IN), dl.lowrank)
    for jac, part in ((jac_a, pair.a), (jac_b, pair.b)):
        j = jac.reshape(D_OUT * D_IN, -1)
        diagonal_part = torch.diag(torch.diagonal(j.T @ torch.diag(vec(dl.diagonal)) @ j))
        torch.testing.assert_close(part.dense(), diagonal_part + j.T @ low.dense() @ j)
    with pytest.raises(StructureError, match="cross"):
        dl.project_lora(a, b, s, cross=True)


@pytest.mark.parametrize("cross", [False, True])
def test_kron_projection_is_gauss_newton_of_lora_map(cross: bool) -> None:
    kron = weight_blocks()["kron"]
    a, b, s = torch.randn(RANK, D_IN), torch.randn(D_OUT, RANK), 1.7
    jac_a, jac_b = jacrev(lambda a_, b_: vec(s * b_ @ a_), argnums=(0, 1))(a, b)
    jacobian = torch.cat([jac_a.reshape(D_OUT * D_IN, -1), jac_b.reshape(D_OUT * D_IN, -1)], 1)
    full = jacobian.T @ kron.dense() @ jacobian
    pair = kron.project_lora(a, b, s, cross=cross)
    n_a = RANK * D_IN
    if not cross:
        full[:n_a, n_a:] = 0
        full[n_a:, :n_a] = 0
    torch.testing.assert_close(pair.dense(), full)
    da, db = torch.randn(RANK, D_IN), torch.randn(D_OUT, RANK)
    both = torch.cat([vec(da), vec(db)])
    torch.testing.assert_close(pair.quad(da, db), both @ full @ both)


def test_diag_projection_is_diagonal_of_gauss_newton() -> None:
    diag = weight_blocks()["diag"]
    a, b, s = torch.randn(RANK, D_IN), torch.randn(D_OUT, RANK), 0.5
    jac_a, jac_b = jacrev(lambda a_, b_: vec(s * b_ @ a_), argnums=(0, 1))(a, b)
    for jac, part in ((jac_a, "a"), (jac_b, "b")):
        j = jac.reshape(D_OUT * D_IN, -1)
        expected = torch.diagonal(j.T @ diag.dense() @ j)
        got = vec(getattr(diag.project_lora(a, b, s), part).diagonal)
        torch.testing.assert_close(got, expected)
    with pytest.raises(StructureError, match="cross"):
        diag.project_lora(a, b, s, cross=True)


def test_tridiag_quad_is_paper_equation_10() -> None:
    """Eq. (10): r = <A, Λ11R A Λ00L> + 2<A, Λ12R B Λ10L> + <B, Λ22R B Λ11L>."""
    pair = weight_blocks()["kron"].project_lora(torch.randn(RANK, D_IN), torch.randn(D_OUT, RANK), 1.0, cross=True)
    da, db = torch.randn(RANK, D_IN), torch.randn(D_OUT, RANK)
    eq10 = (
        (da * (pair.a.output.dense() @ da @ pair.a.input.dense())).sum()
        + 2 * (da * (pair.cross_output @ db @ pair.cross_input.T)).sum()
        + (db * (pair.b.output.dense() @ db @ pair.b.input.dense())).sum()
    )
    torch.testing.assert_close(pair.quad(da, db), eq10)


def test_eigen_compression_keeps_top_pairs_and_mean_tail() -> None:
    x = psd(6, 4)
    values, vectors = torch.linalg.eigh(x)
    factor = DenseFactor(x).compress(2)
    torch.testing.assert_close(factor.eigenvalues, values.flip(0)[:2])
    assert factor.tail == pytest.approx(values[:4].mean().item())
    expected = vectors[:, -2:] @ torch.diag(values[-2:]) @ vectors[:, -2:].T + values[:4].mean() * (
        torch.eye(6) - vectors[:, -2:] @ vectors[:, -2:].T
    )
    torch.testing.assert_close(factor.dense(), expected)
    torch.testing.assert_close(DenseFactor(x).compress(6).dense(), x)


def test_eigen_factor_operations_match_dense() -> None:
    factor = DenseFactor(psd(6, 5)).compress(3)
    assert isinstance(factor, EigenFactor)
    m = torch.randn(2, 6)
    torch.testing.assert_close(factor.apply(m), m @ factor.dense())
    torch.testing.assert_close(factor.sandwich(m), m @ factor.dense() @ m.T)
    torch.testing.assert_close(factor.scale(2.0).dense(), 2 * factor.dense())


def test_pair_scale_and_sum() -> None:
    pair = weight_blocks()["kron"].project_lora(torch.randn(RANK, D_IN), torch.randn(D_OUT, RANK), 1.0, cross=True)
    torch.testing.assert_close(pair.scale(3.0).dense(), 3 * pair.dense())
    torch.testing.assert_close((pair + pair).dense(), 2 * pair.dense())
    assert isinstance(pair, LoraPairBlock)


def test_symmetric_packing_round_trips() -> None:
    x = psd(5, 6)
    packed = pack_symmetric(x)
    assert packed.shape == (15,)
    torch.testing.assert_close(unpack_symmetric(packed, 5), x)
    with pytest.raises(StructureError, match="expected 15"):
        unpack_symmetric(packed[:-1], 5)


def test_shape_mismatch_is_refused(block) -> None:
    with pytest.raises(StructureError, match="delta has shape"):
        block.quad(torch.zeros(D_IN, D_OUT))


@pytest.mark.parametrize("name", ["diag", "diag_lowrank", "kron", "kron_eig", "sum"])
def test_stacked_blocks_sum_the_quadratic_forms(name: str) -> None:
    from laplace_hub.curvature import signature, stack_blocks

    def make(seed: int):
        kron = KronBlock(DenseFactor(psd(D_IN, seed)), DenseFactor(psd(D_OUT, seed + 1)))
        return {
            "diag": DiagBlock(torch.rand(D_OUT, D_IN)),
            "diag_lowrank": diag_lowrank(seed),
            "kron": kron,
            "kron_eig": kron.compress(2),
            "sum": kron + kron.compress(2).scale(0.5),  # a merged posterior: one term per task
        }[name]

    blocks = [make(s) for s in (1, 5, 9)]
    assert len({signature(b) for b in blocks}) == 1
    stacked = stack_blocks(blocks)
    deltas = torch.randn(3, D_OUT, D_IN)
    b, a = torch.randn(3, D_OUT, RANK), torch.randn(3, RANK, D_IN)
    torch.testing.assert_close(stacked.quad(deltas), sum(blk.quad(d) for blk, d in zip(blocks, deltas, strict=True)))
    torch.testing.assert_close(
        stacked.quad_lowrank(b, a), sum(blk.quad_lowrank(bi, ai) for blk, bi, ai in zip(blocks, b, a, strict=True))
    )
    pairs = [
        blk.project_lora(ai, bi, 0.5, cross=name.startswith("kron")) for blk, ai, bi in zip(blocks, a, b, strict=True)
    ]
    da, db = torch.randn(3, RANK, D_IN), torch.randn(3, D_OUT, RANK)
    torch.testing.assert_close(
        stack_blocks(pairs).quad(da, db), sum(p.quad(x, y) for p, x, y in zip(pairs, da, db, strict=True))
    )
    with pytest.raises(StructureError, match="stacked"):
        stack_blocks([make(1), DiagBlock(torch.rand(2, 2))])


def test_symmetric_sandwich_gradient() -> None:
    factor = DenseFactor(psd(D_IN, 3))
    m = torch.randn(2, RANK, D_IN, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: factor.sandwich(x), (m,))


@pytest.mark.parametrize("shape", [(D_OUT, D_IN), (RANK, D_IN), (D_OUT, RANK)])
@pytest.mark.parametrize("eig", [False, True])
def test_kron_quad_gradient(shape: tuple[int, int], eig: bool) -> None:
    block = KronBlock(DenseFactor(psd(shape[1], 1)), DenseFactor(psd(shape[0], 2)))
    block = block.compress(1) if eig else block
    delta = torch.randn(2, *shape, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: block.quad(x), (delta,))
