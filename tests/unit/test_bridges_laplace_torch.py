"""laplace-torch ↔ artifacts: equal to laplace-torch's own precision matrices, in float64, on a tiny MLP."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace_hub import Artifact
from laplace_hub.artifact import ArtifactBuilder, minimal_fields
from laplace_hub.bridges.laplace_torch import from_laplace, to_prior_precision
from laplace_hub.consumers import LaplaceRegularizer, adapted_modules
from laplace_hub.curvature import DenseFactor, DiagBlock, KronBlock
from laplace_hub.errors import LaplaceHubError, MissingExtraError
from laplace_hub.manifest import DatasetInfo, LoraParameterization

laplace = pytest.importorskip("laplace")
from laplace import DiagLaplace, KronLaplace, Laplace  # noqa: E402
from laplace.curvature import AsdlEF, BackPackGGN, CurvlinopsEF, CurvlinopsGGN  # noqa: E402

N, TEMPERATURE, PRIOR = 10, 0.5, 0.3


def mlp(bias: bool = False) -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 5, bias=bias), nn.Tanh(), nn.Linear(5, 3, bias=bias)).double()


def loader(n: int = N) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (n,), generator=gen)), batch_size=4)


def fit(model: nn.Module, structure: str, backend=CurvlinopsEF, **kwargs):
    kwargs.setdefault("temperature", TEMPERATURE)
    kwargs.setdefault("prior_precision", PRIOR)
    la = Laplace(
        model, "classification", subset_of_weights="all", hessian_structure=structure, backend=backend, **kwargs
    )
    la.fit(loader())
    return la


def likelihood_precision(la) -> torch.Tensor:
    """laplace-torch's own dense precision, less its prior, untempered: ``T · (posterior − prior)``."""
    post = la.posterior_precision
    dense = post.to_matrix() if isinstance(la, KronLaplace) else torch.diag(post)
    return la.temperature * (dense - torch.diag(la.prior_precision_diag))


def per_layer(matrix: torch.Tensor, model: nn.Module) -> dict[str, torch.Tensor]:
    blocks, offset = {}, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            size = module.weight.numel()
            blocks[name] = matrix[offset : offset + size, offset : offset + size]
            offset += size
    return blocks


BACKENDS = [
    ("kron", CurvlinopsEF, {}, ("empirical", None, None)),
    ("kron", CurvlinopsGGN, {"backend_kwargs": {"stochastic": True}}, ("mc", 1, None)),
    (
        "kron",
        CurvlinopsGGN,
        {"backend_kwargs": {"stochastic": True}, "asdl_fisher_kwargs": {"mc_samples": 3, "seed": 5}},
        ("mc", 3, 5),
    ),
    ("kron", AsdlEF, {}, ("empirical", None, None)),
    ("kron", BackPackGGN, {"backend_kwargs": {"stochastic": True}}, ("mc", 1, None)),
    ("diag", CurvlinopsEF, {}, ("empirical", None, None)),
    ("diag", CurvlinopsGGN, {"backend_kwargs": {"stochastic": True}}, ("mc", 1, None)),
]


@pytest.mark.parametrize(("structure", "backend", "kwargs", "estimator"), BACKENDS)
def test_blocks_are_laplace_torchs_precision_over_n_data(tmp_path, structure, backend, kwargs, estimator) -> None:
    """Stored ``P`` per layer = (posterior precision − prior) · temperature / n_data, after a verified save."""
    model = mlp()
    la = fit(model, structure, backend, **kwargs)
    art = from_laplace(la, model, base_model="t", dtype="float64", dataset="train")
    opened = Artifact.open(art.save(tmp_path / "a", verify=True).path, check_values=True)
    m = opened.manifest
    assert (m.estimator.kind, m.estimator.mc_samples, m.estimator.seed) == estimator
    assert (m.datasets[0].name, m.datasets[0].sequences, m.datasets[0].tokens) == ("train", N, N)
    assert m.kfac_approx == ("expand" if structure == "kron" else None)
    assert sorted(m.modules) == ["0", "2"] and m.modules["2"].shape == [3, 5]
    want = per_layer(likelihood_precision(la), model)
    for name in ("0", "2"):
        block = opened.block(name, dtype=torch.float64)
        assert isinstance(block, KronBlock if structure == "kron" else DiagBlock)
        torch.testing.assert_close(block.dense(), want[name] / N, rtol=1e-7, atol=1e-10)  # through eigh


def test_kron_factors_keep_their_meaning() -> None:
    """``Σx`` is the mean input covariance as SPEC.md §6 says; ``Σg`` the per-data-point mean of ``g gᵀ``."""
    model = mlp()
    art = from_laplace(fit(model, "kron"), model, base_model="t", dtype="float64")
    x = torch.cat([xb for xb, _ in loader()])
    block = art.block("0", dtype=torch.float64)
    assert isinstance(block, KronBlock)
    torch.testing.assert_close(block.input.dense(), x.T @ x / N)


def test_per_token_divides_by_the_records_tokens() -> None:
    model = mlp()
    la = fit(model, "diag")
    info = DatasetInfo(name="d", sequences=N, tokens=4 * N, batches=3)
    art = from_laplace(la, model, base_model="t", normalization="per_token", dataset=info, dtype="float64")
    assert art.manifest.datasets[0].batches == 3
    want = per_layer(likelihood_precision(la), model)["2"] / (4 * N)
    torch.testing.assert_close(art.block("2", dtype=torch.float64).dense(), want)
    with pytest.raises(LaplaceHubError, match=r"la\.n_data 10") as info_error:
        from_laplace(la, model, base_model="t", dataset=DatasetInfo(name="d", sequences=9, tokens=9, batches=1))
    assert info_error.value.location == "dataset"


def peft_model(model: nn.Module, rank: int = 2, alpha: float = 3.0) -> nn.Module:
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["0", "2"], lora_dropout=0.0)
    peft = get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():
        for m in adapted_modules(peft):
            m.lora_b.normal_(generator=torch.Generator().manual_seed(7))
    return peft.double()


@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_regularizer_equals_laplace_torchs_quadratic_form(structure) -> None:
    """la → artifact → LaplaceRegularizer with λ = n_data / T = ½ δᵀ (posterior − prior) δ, δ = s·B A."""
    model = mlp()
    la = fit(model, structure)
    art = from_laplace(la, model, base_model="t", dtype="float64")
    dense = likelihood_precision(la) / la.temperature  # what laplace-torch's posterior adds to the prior
    peft = peft_model(model)
    penalty = LaplaceRegularizer.from_artifact(art, peft, strength=N / TEMPERATURE, dtype=torch.float64)()
    delta = torch.cat([(m.scaling * m.lora_b @ m.lora_a).reshape(-1) for m in adapted_modules(peft)])
    torch.testing.assert_close(penalty, 0.5 * (delta @ dense @ delta).detach(), rtol=1e-9, atol=1e-12)


def test_prior_precision_round_trip() -> None:
    """diag la → artifact → prior with λ = n_data: laplace-torch's own H; a DiagLaplace takes it as its prior."""
    model = mlp()
    la = fit(model, "diag")
    art = from_laplace(la, model, base_model="t", dtype="float64")
    prior = to_prior_precision(art, model, strength=N)
    assert prior.dtype == torch.float64 and prior.shape == (la.n_params,)
    torch.testing.assert_close(prior, la.H)
    strength = 2.5
    prior = to_prior_precision(art, model, strength=strength)
    again = DiagLaplace(model, "classification", prior_precision=prior, backend=CurvlinopsEF)
    again.fit(loader())
    diagonal = torch.cat([art.block(n, dtype=torch.float64).diagonal.reshape(-1) for n in ("0", "2")])
    torch.testing.assert_close(again.prior_precision_diag, strength * diagonal)
    torch.testing.assert_close(again.posterior_precision - again.H, strength * diagonal)


def kron_artifact(model: nn.Module) -> Artifact:
    gen = torch.Generator().manual_seed(3)
    builder = ArtifactBuilder(dtype="float64")
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            d_out, d_in = module.weight.shape
            a, b = torch.randn(d_in, d_in, generator=gen, dtype=torch.float64), torch.randn(d_out, d_out, generator=gen)
            builder.add(name, (d_out, d_in), KronBlock(DenseFactor(a @ a.T), DenseFactor((b @ b.T).double())))
    return builder.build(**minimal_fields())


def test_kron_is_refused_unless_approximated() -> None:
    model = mlp()
    art = kron_artifact(model)
    with pytest.raises(LaplaceHubError, match="not diagonal") as info:
        to_prior_precision(art, model, strength=1.0)
    assert info.value.location == "0"
    prior = to_prior_precision(art, model, strength=2.0, approximate=True)
    want = torch.cat([art.block(n, dtype=torch.float64).dense().diagonal() for n in ("0", "2")])
    torch.testing.assert_close(prior, 2.0 * want)
    peft = peft_model(model)  # over LoRA factors: the diagonal of the exact projection
    prior = to_prior_precision(art, peft, strength=2.0, approximate=True)
    want = []
    for m in adapted_modules(peft):
        pair = art.block(m.name, dtype=torch.float64).project_lora(m.lora_a.detach(), m.lora_b.detach(), m.scaling)
        want.append(pair.dense().diagonal())
    torch.testing.assert_close(prior, 2.0 * torch.cat(want))


def test_lora_prior_is_the_diagonal_of_the_projection() -> None:
    """Over a PEFT adapter's factors, in laplace-torch's order: λ · diag(Jᵀ diag(vec D) J), J = ∂vec(s·B A)/∂(A, B)."""
    model = mlp()
    gen = torch.Generator().manual_seed(4)
    builder = ArtifactBuilder(dtype="float64")
    for name, shape in (("0", (5, 4)), ("2", (3, 5))):
        builder.add(name, shape, DiagBlock(torch.rand(shape, generator=gen, dtype=torch.float64)))
    art = builder.build(**minimal_fields(kfac_approx=None))
    peft = peft_model(model)
    prior = to_prior_precision(art, peft, strength=3.0)
    want = []
    for m in adapted_modules(peft):
        d = art.block(m.name, dtype=torch.float64).diagonal.reshape(-1)
        a, b = m.lora_a.detach(), m.lora_b.detach()
        ja, jb = torch.autograd.functional.jacobian(lambda a_, b_, s=m.scaling: (s * b_ @ a_).reshape(-1), (a, b))
        for j in (ja.reshape(d.numel(), -1), jb.reshape(d.numel(), -1)):
            want.append(3.0 * (j.T @ torch.diag(d) @ j).diagonal())
    torch.testing.assert_close(prior, torch.cat(want))
    la = DiagLaplace(peft, "classification", prior_precision=prior, backend=CurvlinopsEF)  # the length fits
    torch.testing.assert_close(la.prior_precision_diag, prior)


def test_uncovered_parameters_need_a_default() -> None:
    model = mlp(bias=True)
    builder = ArtifactBuilder(dtype="float64")
    builder.add("0", (5, 4), DiagBlock(torch.ones(5, 4, dtype=torch.float64)))
    art = builder.build(**minimal_fields(kfac_approx=None))
    with pytest.raises(LaplaceHubError, match="covers no such parameter") as info:
        to_prior_precision(art, model, strength=1.0)
    assert info.value.location == "0.bias"
    prior = to_prior_precision(art, model, strength=2.0, default=0.5)
    assert prior.shape == (20 + 5 + 15 + 3,)
    torch.testing.assert_close(prior[:20], torch.full((20,), 2.0, dtype=torch.float64))
    torch.testing.assert_close(prior[20:], torch.full((23,), 0.5, dtype=torch.float64))


def test_lora_artifact_and_negative_strength_are_refused() -> None:
    model = mlp()
    builder = ArtifactBuilder(dtype="float64")
    builder.add("0", (5, 4), DiagBlock(torch.ones(5, 4, dtype=torch.float64)))
    art = builder.build(**minimal_fields(kfac_approx=None))
    with pytest.raises(LaplaceHubError, match="strength"):
        to_prior_precision(art, model, strength=-1.0)
    lora = LoraParameterization(kind="lora", rank=2, alpha=4.0, init_method="gaussian")
    relabelled = Artifact(art.manifest.model_copy(update={"parameterization": lora}), art.tensor)
    with pytest.raises(LaplaceHubError, match="lora-parameterised"):
        to_prior_precision(relabelled, model, strength=1.0)


def test_refusals_name_what_to_change() -> None:
    model = mlp()
    cases = [
        (lambda: fit(mlp(), "kron", CurvlinopsGGN), "exact GGN", "la"),
        (lambda: fit(mlp(), "kron", asdl_fisher_kwargs={"num_per_example_loss_terms": 2}), "asdl_fisher_kwargs", "la"),
        (lambda: fit(mlp(bias=True), "diag"), "not the weight of an nn.Linear", "0.bias"),
    ]
    for make, match, location in cases:
        la = make()
        with pytest.raises(LaplaceHubError, match=match) as info:
            from_laplace(la, la.model, base_model="t")
        assert info.value.location == location
    biased = mlp(bias=True)  # laplace-torch's Kron fails to fit a frozen bias before the last layer
    biased[0].bias = None
    biased[2].bias.requires_grad_(False)
    with pytest.raises(LaplaceHubError, match="bias") as info:
        from_laplace(fit(biased, "kron"), biased, base_model="t")
    assert info.value.location == "2.weight"
    diag = fit(biased, "diag")  # a frozen bias is no part of a diagonal
    assert sorted(from_laplace(diag, biased, base_model="t").manifest.modules) == ["0", "2"]
    regression = Laplace(model, "regression", subset_of_weights="all", hessian_structure="diag", backend=CurvlinopsEF)
    regression.fit(DataLoader(TensorDataset(torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 3).double())))
    with pytest.raises(LaplaceHubError, match="cross-entropy"):
        from_laplace(regression, model, base_model="t")
    last = Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="diag")
    with pytest.raises(LaplaceHubError, match="subset_of_weights='all'"):
        from_laplace(last, model, base_model="t")
    with pytest.raises(LaplaceHubError, match="not fitted"):
        from_laplace(KronLaplace(model, "classification", backend=CurvlinopsEF), model, base_model="t")
    la = fit(model, "diag")
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(LaplaceHubError, match="changed since the fit") as info:
        from_laplace(la, model, base_model="t")
    assert info.value.location == "model"


def test_missing_laplace_torch_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "laplace", None)
    with pytest.raises(MissingExtraError, match=r"laplace-hub\[laplace-torch\]"):
        from_laplace(object(), mlp(), base_model="t")
