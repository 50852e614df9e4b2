"""Memory plans and passes give the same artifact as one pass; sketched K-FAC against the dense one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from laplace_hub.artifact import Artifact
from laplace_hub.curvature import EigenFactor, KronBlock
from laplace_hub.errors import LaplaceHubError
from laplace_hub.manifest import BaseModelInfo
from laplace_hub.models import select_targets
from laplace_hub.producers import ComputeOptions, compute_artifact
from laplace_hub.producers.accumulate import CurvatureAccumulator
from laplace_hub.producers.compute import _backward_batch, lora_inits
from laplace_hub.producers.plan import PassPlan, input_owners, module_bytes, plan_passes
from tests.conftest import tiny_llama
from tests.unit.test_producers import batches  # noqa: F401  (fixture)

OPTIONS = [
    dict(structure="kron"),
    dict(structure="kron", estimator="mc", mc_samples=2),
    dict(structure="kron", eig_rank=3, eig_sketch=True, sketch_oversample=2),
    dict(structure="diag"),
    dict(structure="diag_lowrank", lowrank_rank=2, sketch_oversample=2),
    dict(structure="diag", parameterization="lora", lora_rank=2),
    dict(structure="kron_tridiag", parameterization="lora", lora_rank=2),
]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_llama()


def _options(**kw: object) -> ComputeOptions:
    return ComputeOptions(accumulate_dtype=torch.float64, dtype="float64", **kw)  # type: ignore[arg-type]


def _plan(model: torch.nn.Module, batch: dict, options: ComputeOptions, budget: int) -> PassPlan:
    targets = select_targets(model, "all-linear")
    shapes = {n: (m.out_features, m.in_features) for n, m in targets.items()}
    return plan_passes(shapes, input_owners(model, targets, batch), options, budget)


def _save(art: Artifact, folder: Path) -> dict[str, bytes]:
    art.save(folder)
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("kw", OPTIONS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_passes_write_the_same_bytes_as_one_pass(model, batches, kw, tmp_path) -> None:  # noqa: F811
    options = _options(**kw)
    targets = select_targets(model, "all-linear")
    one = compute_artifact(model, {"src": batches}, targets, options, BaseModelInfo(repo_id="t"))
    smallest = max(module_bytes((m.out_features, m.in_features), True, options) for m in targets.values())
    plan = _plan(model, batches[0], options, 2 * smallest)
    assert len(plan.groups) > 2 and plan.peak <= 2 * smallest
    assert sorted(n for g in plan.groups for n in g) == sorted(targets)
    many = compute_artifact(model, {"src": batches}, targets, options, BaseModelInfo(repo_id="t"), plan=plan)
    (tmp_path / "spill").mkdir()
    spilled = compute_artifact(
        model, {"src": batches}, targets, options, BaseModelInfo(repo_id="t"), plan=plan, spill=tmp_path / "spill"
    )
    assert len(list((tmp_path / "spill").iterdir())) == len(plan.groups)  # each pass's blocks left memory as it ended
    expected = _save(one, tmp_path / "one")
    assert expected == _save(many, tmp_path / "many") == _save(spilled, tmp_path / "spilled")
    assert all(m.weight.grad is None for m in targets.values())  # gradients are dropped, not kept


@pytest.mark.parametrize("per_dataset", [False, True])
def test_spilled_half_precision_artifacts_are_the_in_memory_ones(model, batches, per_dataset, tmp_path) -> None:  # noqa: F811
    """Storage dtype and datasets stored separately: spilling each pass changes no byte."""
    targets = select_targets(model, "all-linear")
    datasets = {"a": batches[:1], "b": batches[1:]}
    for kw in (dict(structure="diag"), dict(structure="kron", eig_rank=3)):
        options = ComputeOptions(dtype="bfloat16", per_dataset=per_dataset, **kw)  # type: ignore[arg-type]
        plan = _plan(
            model,
            batches[0],
            options,
            2 * max(module_bytes((m.out_features, m.in_features), True, options) for m in targets.values()),
        )
        spill = tmp_path / f"spill-{kw['structure']}"
        spill.mkdir()
        held = compute_artifact(model, datasets, targets, options, BaseModelInfo(repo_id="t"), plan=plan)
        spilled = compute_artifact(
            model, datasets, targets, options, BaseModelInfo(repo_id="t"), plan=plan, spill=spill
        )
        assert len(list(spill.iterdir())) == len(plan.groups) * (2 if per_dataset else 1)
        assert list(spilled.manifest.modules) == list(targets)  # the targets' order, not the passes'
        assert _save(held, tmp_path / f"held-{kw['structure']}") == _save(
            spilled, tmp_path / f"spilled-{kw['structure']}"
        )


def test_input_sharing_is_found_by_tensor_identity(model, batches) -> None:  # noqa: F811
    owners = input_owners(model, select_targets(model, "all-linear"), batches[0])
    layer = "model.layers.0"
    assert owners[f"{layer}.self_attn.k_proj"] == owners[f"{layer}.self_attn.v_proj"] == f"{layer}.self_attn.q_proj"
    assert owners[f"{layer}.mlp.up_proj"] == f"{layer}.mlp.gate_proj"
    assert owners[f"{layer}.self_attn.o_proj"] == f"{layer}.self_attn.o_proj"


def test_plan_keeps_shared_inputs_together_and_refuses_an_oversized_unit(model, batches) -> None:  # noqa: F811
    options = _options()
    plan = _plan(model, batches[0], options, 10**9)
    assert len(plan.groups) == 1
    with pytest.raises(LaplaceHubError, match=r"gate_proj, .*up_proj take .* over the budget") as err:
        _plan(model, batches[0], options, 8 * (12 * 12 * 2 + 8 * 8) - 1)  # gate and up: Σg twice, one Σx
    assert err.value.location == "max_memory"
    for group in _plan(model, batches[0], options, 4000).groups:
        for layer in (0, 1):
            qkv = {f"model.layers.{layer}.self_attn.{p}_proj" for p in "qkv"}
            assert not qkv & set(group) or qkv <= set(group)


@pytest.mark.parametrize("kw", OPTIONS[:5] + OPTIONS[5:6], ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_predicted_bytes_are_what_the_accumulator_holds(model, batches, kw) -> None:  # noqa: F811
    options = _options(**kw)
    targets = select_targets(model, "all-linear")
    owners = input_owners(model, targets, batches[0])
    acc = CurvatureAccumulator(
        dict(targets),
        "diag" if options.diagonal else "kron",
        options.normalization,
        batch_gradient=False,
        lora=lora_inits(targets, options) if options.parameterization == "lora" else {},
        sketch_size=options.sketch_size,
        cov_sketch_size=options.cov_sketch_size,
        dtype=options.compute_dtype,
    )
    for m in targets.values():
        m.weight.requires_grad_(True)
    acc.attach()
    try:
        _backward_batch(model, batches[0], acc, options, torch.Generator().manual_seed(0))
    finally:
        acc.detach()
        for m in targets.values():
            m.weight.requires_grad_(False)
            m.weight.grad = None
    shapes = {n: (m.out_features, m.in_features) for n, m in targets.items()}
    assert acc.nbytes() == plan_passes(shapes, owners, options, None).peak


@pytest.mark.parametrize("rank", [2, 8])
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_sketched_kron_eig_equals_the_dense_eigendecomposition_when_wide(model, batches, rank, kfac_approx) -> None:  # noqa: F811
    targets = select_targets(model, "q_proj,o_proj,down_proj")
    base = dict(structure="kron", eig_rank=rank, kfac_approx=kfac_approx)
    exact = compute_artifact(model, {"s": batches}, targets, _options(**base), BaseModelInfo(repo_id="t"))
    wide = _options(**base, eig_sketch=True, sketch_oversample=12)  # rank + 12 ≥ every d (≤ 12)
    sketched = compute_artifact(model, {"s": batches}, targets, wide, BaseModelInfo(repo_id="t"))
    for name in targets:
        a, b = exact.block(name, dtype=torch.float64), sketched.block(name, dtype=torch.float64)
        assert isinstance(b, KronBlock) and isinstance(b.input, EigenFactor)
        for fa, fb in ((a.input, b.input), (a.output, b.output)):
            kept = fb.eigenvalues.shape[0]  # fewer than the rank where the factor has lower rank
            assert (fa.eigenvalues[kept:].abs() < 1e-12).all()
            torch.testing.assert_close(fb.eigenvalues, fa.eigenvalues[:kept], rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(fb.dense(), fa.dense(), rtol=1e-8, atol=1e-10)


def test_narrow_sketch_is_a_valid_underestimate(model, batches) -> None:  # noqa: F811
    targets = select_targets(model, "down_proj")
    exact = compute_artifact(model, {"s": batches}, targets, _options(structure="kron"), BaseModelInfo(repo_id="t"))
    narrow = _options(structure="kron", eig_rank=2, eig_sketch=True, sketch_oversample=1)
    sketched = compute_artifact(model, {"s": batches}, targets, narrow, BaseModelInfo(repo_id="t"))
    for name in targets:
        dense_in = exact.block(name, dtype=torch.float64).input.dense()
        approx = sketched.block(name, dtype=torch.float64).input
        assert approx.eigenvalues[0] <= torch.linalg.eigvalsh(dense_in)[-1] * (1 + 1e-9)
        torch.testing.assert_close(approx.dense().trace(), dense_in.trace())  # the tail keeps the trace


def test_refused_options() -> None:
    ComputeOptions(structure="kron", dtype="bfloat16").check()  # readers decode what is stored (SPEC.md §8.3)
    ComputeOptions(structure="kron", eig_rank=4, dtype="bfloat16").check()
    with pytest.raises(LaplaceHubError, match="needs `eig_rank`"):
        ComputeOptions(structure="kron", eig_sketch=True).check()
    with pytest.raises(LaplaceHubError, match="≥ 1"):
        ComputeOptions(structure="kron", eig_rank=0).check()


@pytest.mark.parametrize(
    ("target", "reaches_layer_0"), [("model.layers.1.mlp.down_proj", False), ("model.layers.0.mlp.down_proj", True)]
)
def test_a_pass_backward_stops_at_its_lowest_module(model, batches, target, reaches_layer_0) -> None:  # noqa: F811
    calls = []
    handle = model.model.layers[0].register_full_backward_hook(lambda *_: calls.append(1))
    try:
        compute_artifact(
            model, {"s": batches}, select_targets(model, target), _options(structure="diag"), BaseModelInfo(repo_id="t")
        )
    finally:
        handle.remove()
    assert bool(calls) == reaches_layer_0


def test_a_narrow_sketch_never_puts_the_tail_above_a_kept_eigenvalue() -> None:
    """A flat spectrum: Nyström underestimates the top, so the rest of the trace exceeds λ_k."""
    from laplace_hub.curvature.sketch import eigen_factor_from_sketch, nystrom_eigh, random_directions

    n, rank = 128, 32
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    matrix = basis @ torch.diag(torch.linspace(2.0, 1.0, n, dtype=torch.float64)) @ basis.T
    test = random_directions("flat", rank + 1, (n,), 0, torch.float64)
    values, _ = nystrom_eigh(test @ matrix, test)
    uncapped = float(matrix.trace() - values[:rank].sum()) / (n - rank)
    assert uncapped > float(values[rank - 1])  # the case the cap is for
    factor = eigen_factor_from_sketch(test @ matrix, test, matrix.trace(), rank)
    assert factor.tail == pytest.approx(float(factor.eigenvalues[-1]))
    assert torch.all(factor.eigenvalues[:-1] >= factor.eigenvalues[1:])
