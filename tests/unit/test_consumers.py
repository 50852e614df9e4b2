"""The regularizer against explicit dense quadratic forms on a tiny PEFT Llama, in float64."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from laplace_hub.artifact import Artifact
from laplace_hub.consumers import LaplaceRegularizer, adapted_modules, apply_lora_init, regularized_loss
from laplace_hub.data import pad_batch
from laplace_hub.errors import LaplaceHubError, ModelMismatchError
from laplace_hub.fingerprint import legacy_fingerprint
from laplace_hub.manifest import BaseModelInfo, required_version
from laplace_hub.models import select_targets
from laplace_hub.producers import ComputeOptions, compute_artifact
from tests.conftest import tiny_llama

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def base() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def batches():
    gen = torch.Generator().manual_seed(1)
    return [pad_batch([torch.randint(1, 23, (n,), generator=gen).tolist() for n in (5, 3, 6)], 0)]


def artifact(base, batches, targets=TARGETS, **options):
    opts = ComputeOptions(accumulate_dtype=torch.float64, dtype="float64", **options)
    return compute_artifact(
        base, {"src": batches}, select_targets(base, list(targets)), opts, BaseModelInfo(repo_id="t")
    )


def peft_model(base, adapter="default", rank=2, alpha=3.0, rslora=False, randomize=True):
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0, use_rslora=rslora)
    model = get_peft_model(copy.deepcopy(base), config, adapter_name=adapter)
    if randomize:
        with torch.no_grad():
            for m in adapted_modules(model, adapter):
                m.lora_b.normal_()
    return model.double()


STRUCTURES = [
    dict(structure="diag"),
    dict(structure="kron"),
    dict(structure="kron", eig_rank=3),
    dict(structure="kron", kfac_approx="reduce"),
    dict(structure="diag_lowrank", lowrank_rank=2),
]


@pytest.mark.parametrize("options", STRUCTURES, ids=lambda o: "-".join(map(str, o.values())))
@pytest.mark.parametrize("rslora", [False, True])
def test_weight_mode_equals_dense_quadratic_form(base, batches, options, rslora: bool) -> None:
    art = artifact(base, batches, **options)
    model = peft_model(base, adapter="other", rslora=rslora)
    reg = LaplaceRegularizer.from_artifact(art, model, strength=0.7, adapter="other")
    penalty = reg()
    expected = 0.0
    for m in adapted_modules(model, "other"):
        delta = (m.scaling * m.lora_b @ m.lora_a).reshape(-1)
        dense = art.block(m.name, dtype=torch.float64).dense()
        expected = expected + delta @ dense @ delta
    expected = 0.5 * 0.7 * expected
    torch.testing.assert_close(penalty.double(), expected.detach(), rtol=1e-5, atol=1e-8)
    params = [p for m in adapted_modules(model, "other") for p in (m.lora_a, m.lora_b)]
    got = torch.autograd.grad(penalty, params)
    want = torch.autograd.grad(expected, params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(("structure", "cross"), [("kron", False), ("kron", True), ("diag_lowrank", False)])
def test_lora_init_mode_projects_once_at_init(base, batches, structure: str, cross: bool) -> None:
    art = artifact(base, batches, structure=structure)
    model = peft_model(base)
    reg = LaplaceRegularizer.from_artifact(art, model, strength=2.0, mode="lora_init", cross=cross)
    inits = {m.name: (m.lora_a.detach().clone(), m.lora_b.detach().clone()) for m in adapted_modules(model)}
    with torch.no_grad():
        for m in adapted_modules(model):
            m.lora_a.add_(0.1 * torch.randn_like(m.lora_a))
            m.lora_b.add_(0.1 * torch.randn_like(m.lora_b))
    expected = 0.0
    for m in adapted_modules(model):
        a0, b0 = inits[m.name]
        pair = art.block(m.name, dtype=torch.float64).project_lora(a0, b0, m.scaling, cross=cross)
        delta = torch.cat([(m.lora_a - a0).reshape(-1), (m.lora_b - b0).reshape(-1)])
        expected = expected + delta @ pair.dense() @ delta
    torch.testing.assert_close(reg().double(), (expected * 1.0).detach(), rtol=1e-5, atol=1e-8)


def test_paper_eq6_diag_lora_artifact(base, batches) -> None:
    """Eq. (6): r = Σ D_A (A − μ_A)² + Σ D_B (B − μ_B)², with the stored init as μ."""
    art = artifact(base, batches, structure="diag", parameterization="lora", lora_rank=2, lora_alpha=3.0)
    model = peft_model(base, randomize=False)
    with pytest.raises(ModelMismatchError, match="apply_lora_init"):
        LaplaceRegularizer.from_artifact(art, model, strength=1.0, mode="lora_init")
    assert apply_lora_init(model, art) == 4
    reg = LaplaceRegularizer.from_artifact(art, model, strength=1.0, mode="lora_init")
    assert float(reg()) == 0.0
    with torch.no_grad():
        for m in adapted_modules(model):
            m.lora_b.add_(torch.randn_like(m.lora_b))
    expected = 0.0
    for m in adapted_modules(model):
        a0, b0 = art.lora_init(m.name)
        pair = art.block(m.name, dtype=torch.float64)
        expected += float(
            (pair.a.diagonal * (m.lora_a - a0).square()).sum() + (pair.b.diagonal * (m.lora_b - b0).square()).sum()
        )
    assert float(reg()) == pytest.approx(0.5 * expected, rel=1e-5)


def test_tridiag_lora_artifact_eq10(base, batches) -> None:
    art = artifact(base, batches, structure="kron_tridiag", parameterization="lora", lora_rank=2, lora_alpha=3.0)
    model = peft_model(base, randomize=False)
    apply_lora_init(model, art)
    reg = LaplaceRegularizer.from_artifact(art, model, strength=1.0, mode="lora_init")
    with torch.no_grad():
        for m in adapted_modules(model):
            m.lora_b.add_(torch.randn_like(m.lora_b))
            m.lora_a.add_(torch.randn_like(m.lora_a))
    expected = 0.0
    for m in adapted_modules(model):
        a0, b0 = art.lora_init(m.name)
        delta = torch.cat([(m.lora_a - a0).reshape(-1), (m.lora_b - b0).reshape(-1)])
        expected += float(delta @ art.block(m.name, dtype=torch.float64).dense() @ delta)
    assert float(reg()) == pytest.approx(0.5 * expected, rel=1e-5)


def test_the_fingerprint_checks_exactly_the_adapted_modules(base, batches) -> None:
    """Issue 20: an artifact over q,k,v,o and an adapter over q,v (the guides' setup): a wrong base model is refused.

    Spec 1.3's per-module digests check exactly the adapted modules; a 1.0–1.2 artifact's single hash is
    checked over all of its modules, read from the model whether adapted or not.
    """
    art = artifact(base, batches, structure="diag", targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    assert art.manifest.base_model.fingerprint.modules is not None
    q0 = "model.layers.0.self_attn.q_proj"
    changed_q, changed_k = copy.deepcopy(base), copy.deepcopy(base)
    with torch.no_grad():
        changed_q.get_submodule(q0).weight.add_(1e-3)
        changed_k.get_submodule("model.layers.0.self_attn.k_proj").weight.add_(1e-3)
    with pytest.raises(ModelMismatchError, match=f"1 module.*{q0}"):
        LaplaceRegularizer.from_artifact(art, peft_model(changed_q), strength=1.0)
    random_init = copy.deepcopy(base)
    with torch.no_grad():
        for p in random_init.parameters():
            p.normal_()
    with pytest.raises(ModelMismatchError, match="fingerprint mismatch") as err:
        LaplaceRegularizer.from_artifact(art, peft_model(random_init), strength=1.0, mode="lora_init")
    assert "4 module(s)" in str(err.value)  # q and v of both layers
    LaplaceRegularizer.from_artifact(art, peft_model(changed_k), strength=1.0)  # k is not adapted: not checked
    LaplaceRegularizer.from_artifact(art, peft_model(changed_q), strength=1.0, check_fingerprint=False)
    # a 1.2 artifact's single hash over q, k, v and o
    legacy = legacy_fingerprint(select_targets(base, ["q_proj", "k_proj", "v_proj", "o_proj"]))
    old = Artifact(
        art.manifest.model_copy(update={"base_model": BaseModelInfo(repo_id="t", fingerprint=legacy)}), art.tensor
    )
    assert required_version(old.manifest) == "1.0"
    LaplaceRegularizer.from_artifact(old, peft_model(base), strength=1.0)
    with pytest.raises(ModelMismatchError, match="fingerprint mismatch"):
        LaplaceRegularizer.from_artifact(old, peft_model(changed_k), strength=1.0)  # k counts in the one hash


def test_identity_baseline_is_l2(base) -> None:
    model = peft_model(base)
    weight = LaplaceRegularizer.identity(model, strength=1.0)
    expected = sum(float((m.scaling * m.lora_b @ m.lora_a).square().sum()) for m in adapted_modules(model))
    assert float(weight()) == pytest.approx(0.5 * expected, rel=1e-5)
    factors = LaplaceRegularizer.identity(model, strength=1.0, mode="lora_init")
    assert float(factors()) == 0.0


def test_mismatches_are_refused(base, batches) -> None:
    art = artifact(base, batches, structure="kron")
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight.add_(1e-3)
    with pytest.raises(ModelMismatchError, match="fingerprint"):
        LaplaceRegularizer.from_artifact(art, peft_model(other), strength=1.0)
    LaplaceRegularizer.from_artifact(art, peft_model(other), strength=1.0, check_fingerprint=False)
    config = LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj"])
    more = get_peft_model(copy.deepcopy(base), config).double()
    with pytest.raises(ModelMismatchError, match="k_proj"):
        LaplaceRegularizer.from_artifact(art, more, strength=1.0, on_unmatched="error")
    with pytest.raises(ModelMismatchError, match="no LoRA layers"):
        LaplaceRegularizer.from_artifact(art, base, strength=1.0)
    lora_art = artifact(base, batches, structure="kron", parameterization="lora", lora_rank=2)
    with pytest.raises(LaplaceHubError, match="lora_init"):
        LaplaceRegularizer.from_artifact(lora_art, peft_model(base), strength=1.0)


def test_regularized_training_moves_less_in_sharp_directions(base, batches) -> None:
    art = artifact(base, batches, structure="kron")
    results = {}
    for strength in (0.0, 100.0):
        torch.manual_seed(0)
        model = peft_model(base, randomize=False)
        reg = LaplaceRegularizer.from_artifact(art, model, strength=strength)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        target = pad_batch([[3, 4, 5, 6, 7, 8]] * 2, 0)
        for _ in range(30):
            loss = model(**target).loss
            opt.zero_grad()
            regularized_loss(loss, reg).backward()
            opt.step()
        probe = LaplaceRegularizer.from_artifact(art, model, strength=2.0)
        results[strength] = float(probe())
    assert results[100.0] < 0.5 * results[0.0]


def test_bf16_model_penalty_accumulates_in_float32(base, batches) -> None:
    art = artifact(base, batches, structure="kron")
    model = peft_model(base)
    exact = float(LaplaceRegularizer.from_artifact(art, model, strength=1.0)())
    half = model.to(torch.bfloat16)
    penalty = LaplaceRegularizer.from_artifact(art, half, strength=1.0, check_fingerprint=False)()
    assert penalty.dtype == torch.float32
    assert float(penalty) == pytest.approx(exact, rel=0.05)  # bf16 LoRA factors, float32 arithmetic
    penalty.backward()
    assert next(m.lora_b.grad for m in adapted_modules(half)).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_penalty_in_a_chosen_dtype(base, batches, dtype: torch.dtype) -> None:
    """Blocks held in the compute dtype: float64 is exact, bfloat16 within its rounding."""
    art = artifact(base, batches, structure="kron")
    model = peft_model(base)
    exact = float(LaplaceRegularizer.from_artifact(art, model, strength=1.0)())
    reg = LaplaceRegularizer.from_artifact(art, model, strength=1.0, dtype=dtype)
    assert all(t.dtype == dtype for t in reg.buffers())
    penalty = reg()
    assert penalty.dtype == dtype
    assert float(penalty) == pytest.approx(exact, rel=1e-6 if dtype == torch.float64 else 3e-2)
    penalty.backward()


@pytest.mark.parametrize("strength", [-1.0, float("nan"), float("inf")])
def test_a_negative_or_non_finite_strength_is_refused(base, batches, strength: float) -> None:
    art = artifact(base, batches, structure="kron")
    with pytest.raises(LaplaceHubError, match="strength: must be a finite number ≥ 0"):
        LaplaceRegularizer.from_artifact(art, peft_model(base), strength=strength)
