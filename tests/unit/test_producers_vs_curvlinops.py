"""Our K-FAC hooks against curvlinops' KFACLinearOperator (the independent reference), float64."""

from __future__ import annotations

import pytest
import torch

from laplace_hub.data import pad_batch
from laplace_hub.manifest import BaseModelInfo
from laplace_hub.models import select_targets
from laplace_hub.producers import ComputeOptions, compute_artifact
from tests.conftest import tiny_llama

curvlinops = pytest.importorskip("curvlinops")
from tests.reference.curvlinops_kfac import curvlinops_factors  # noqa: E402

NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]


@pytest.fixture(scope="module")
def inputs() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return [torch.randint(1, 23, (3, 6), generator=gen), torch.randint(1, 23, (2, 6), generator=gen)]


def ours(model, inputs, **options):
    batches = [pad_batch(ids.tolist(), 0) for ids in inputs]
    opts = ComputeOptions(accumulate_dtype=torch.float64, dtype="float64", **options)
    targets = {n: m for n, m in select_targets(model, "q_proj,down_proj").items() if n in NAMES}
    return compute_artifact(model, {"src": batches}, targets, opts, BaseModelInfo(repo_id="t"))


def test_curvlinops_canary() -> None:
    """Fails loudly when the private fields this adapter reads move (curvlinops pinned to 3.0.x)."""
    from importlib.metadata import version

    from curvlinops import KFACLinearOperator

    assert version("curvlinops-for-pytorch").startswith("3.0."), "re-check the adapter for this curvlinops"
    layer = torch.nn.Linear(3, 2)
    data = [(torch.randn(4, 3), torch.randint(0, 2, (4,)))]
    kfac = KFACLinearOperator(layer, torch.nn.CrossEntropyLoss(), [layer.weight], data, check_deterministic=False)
    kfac.compute_kronecker_factors()
    assert kfac._input_covariances[""].shape == (3, 3)
    assert kfac._gradient_covariances[""].shape == (2, 2)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_empirical_kfac_equals_curvlinops(inputs, approx: str) -> None:
    model = tiny_llama()
    art = ours(model, inputs, structure="kron", kfac_approx=approx)
    reference = curvlinops_factors(model, inputs, NAMES, "empirical", approx)
    for name in NAMES:
        block = art.block(name, dtype=torch.float64)
        torch.testing.assert_close(block.input.dense(), reference[name][0])
        torch.testing.assert_close(block.output.dense(), reference[name][1])


def test_mc_kfac_converges_to_curvlinops_exact_fisher(inputs) -> None:
    """MC labels draw from different generators here and there, so compare both with the exact
    (type-2) Fisher that MC estimates: many draws must land close to it."""
    model = tiny_llama()
    art = ours(model, inputs, structure="kron", estimator="mc", mc_samples=400, seed=0)
    exact = curvlinops_factors(model, inputs, NAMES, "type-2", "expand")
    for name in NAMES:
        block = art.block(name, dtype=torch.float64)
        torch.testing.assert_close(block.input.dense(), exact[name][0])
        error = (block.output.dense() - exact[name][1]).norm() / exact[name][1].norm()
        assert error < 0.15, f"{name}: MC Σg is {error:.2%} from the exact Fisher"
