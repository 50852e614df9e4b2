"""Every common architecture, every linear module: tiny random-init models built from transformers' configs.

For each: ``all-linear`` finds the expected modules (GPT-2's ``Conv1D`` included, the LM head not),
kron and diag artifacts are valid, and a regularizer attaches to a PEFT model (PEFT's default
targets, and all-linear) and equals the dense ``λ/2·vec(Δ)ᵀ P vec(Δ)``, in float64.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS
from torch import nn

from laplace_hub.artifact import Artifact
from laplace_hub.consumers import LaplaceRegularizer, adapted_modules, apply_lora_init
from laplace_hub.data import pad_batch
from laplace_hub.errors import LaplaceHubError, ModelMismatchError
from laplace_hub.fingerprint import fingerprint_weights
from laplace_hub.linear import is_transposed, linear_shape, weight_out_in
from laplace_hub.manifest import BaseModelInfo
from laplace_hub.models import select_targets
from laplace_hub.producers import ComputeOptions, compute_artifact
from tests.unit.test_producers import per_sequence_grads

ATTENTION = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2)
TOKENS = dict(vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA_LIKE = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@dataclass(frozen=True)
class Arch:
    config: str  # the transformers config class
    kwargs: dict[str, Any]
    suffixes: set[str]  # the all-linear modules' last name parts


ARCHS = {
    "llama": Arch("LlamaConfig", ATTENTION, LLAMA_LIKE),
    "qwen2": Arch("Qwen2Config", ATTENTION, LLAMA_LIKE),
    "mistral": Arch("MistralConfig", ATTENTION, LLAMA_LIKE),
    "gemma2": Arch("Gemma2Config", {**ATTENTION, "head_dim": 8}, LLAMA_LIKE),
    "gemma3": Arch("Gemma3TextConfig", {**ATTENTION, "head_dim": 8}, LLAMA_LIKE),
    "phi3": Arch("Phi3Config", ATTENTION, {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
    "gpt2": Arch("GPT2Config", dict(n_embd=32, n_head=4, n_positions=32), {"c_attn", "c_proj", "c_fc"}),
    "gpt_neox": Arch(
        "GPTNeoXConfig",
        dict(hidden_size=32, intermediate_size=48, num_attention_heads=4),
        {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"},
    ),
}
STRUCTURES = ["kron", "diag"]


@functools.cache
def base(arch: str) -> nn.Module:
    """A 2-layer random-init causal LM in float64, the same every call."""
    spec = ARCHS[arch]
    config = getattr(transformers, spec.config)(**TOKENS, num_hidden_layers=2, n_layer=2, **spec.kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.double().eval()


@functools.cache
def batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (5, 3, 6, 4)]
    return [pad_batch(seqs[:2], 0), pad_batch(seqs[2:], 0, prompt_lengths=[1, 1])]


@functools.cache
def artifact(arch: str, structure: str, **options: Any) -> Artifact:
    opts = ComputeOptions(structure=structure, accumulate_dtype=torch.float64, dtype="float64", **options)
    model = base(arch)
    targets = select_targets(model, "all-linear")
    return compute_artifact(model, {"src": batches()}, targets, opts, BaseModelInfo(repo_id=arch))


def peft_model(arch: str, targets: str | None) -> nn.Module:
    """A PEFT LoRA model: ``targets=None`` is PEFT's default for the architecture, with random nonzero B."""
    model = get_peft_model(copy.deepcopy(base(arch)), LoraConfig(r=2, lora_alpha=3.0, target_modules=targets))
    torch.manual_seed(2)
    with torch.no_grad():
        for m in adapted_modules(model):
            m.lora_b.normal_()
    return model.double()


@pytest.mark.parametrize("arch", ARCHS)
def test_all_linear_finds_every_linear_module_but_the_head(arch: str) -> None:
    model = base(arch)
    targets = select_targets(model, "all-linear")
    assert {name.rsplit(".", 1)[-1] for name in targets} == ARCHS[arch].suffixes
    assert len(targets) == 2 * (len(ARCHS[arch].suffixes) + (arch == "gpt2"))  # GPT-2 has two c_proj a layer
    assert model.get_output_embeddings() not in targets.values()
    for module in targets.values():  # [d_out, d_in], as the module maps d_in to d_out
        d_out, d_in = linear_shape(module)
        assert module(torch.zeros(1, d_in, dtype=torch.float64)).shape == (1, d_out)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("arch", ARCHS)
def test_artifact_is_valid(arch: str, structure: str, tmp_path) -> None:
    art = artifact(arch, structure)
    targets = select_targets(base(arch), "all-linear")
    assert {n: tuple(m.shape) for n, m in art.manifest.modules.items()} == {
        n: linear_shape(m) for n, m in targets.items()
    }
    fingerprint = fingerprint_weights({n: weight_out_in(m) for n, m in targets.items()})
    assert art.manifest.base_model.fingerprint == fingerprint
    opened = Artifact.open(art.save(tmp_path / arch).path, verify_checksums=True, check_values=True)
    assert list(opened.manifest.modules) == list(targets)


@pytest.mark.parametrize("arch", ARCHS)
def test_diag_equals_brute_force(arch: str) -> None:
    """The hooks' curvature is that of the weight in [d_out, d_in] layout (a Conv1D's gradient transposed)."""
    model, art = base(arch), artifact(arch, "diag")
    targets = select_targets(model, "all-linear")
    grads = [g for g, _ in per_sequence_grads(model, batches(), list(targets))]
    for name, module in targets.items():
        per_sequence = [g[f"{name}.weight"].T if is_transposed(module) else g[f"{name}.weight"] for g in grads]
        expected = torch.stack(per_sequence).square().mean(0)
        torch.testing.assert_close(art.block(name, dtype=torch.float64).diagonal, expected)


@pytest.mark.parametrize("peft_targets", [None, "all-linear"], ids=["peft-default", "all-linear"])
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("arch", ARCHS)
def test_regularizer_equals_dense_quadratic_form(arch: str, structure: str, peft_targets: str | None) -> None:
    art = artifact(arch, structure)
    if peft_targets is None and base(arch).config.model_type not in PEFT_DEFAULTS:
        pytest.xfail(f"PEFT has no default target modules for {arch}")
    model = peft_model(arch, peft_targets)
    # on_unmatched="error": every adapted module has curvature; with all-linear the fingerprint is checked too
    unmatched = "error" if peft_targets else "ignore"
    reg = LaplaceRegularizer.from_artifact(art, model, strength=0.7, on_unmatched=unmatched)
    modules = list(adapted_modules(model))
    assert modules
    expected = torch.zeros((), dtype=torch.float64)
    for m in modules:
        delta = m.scaling * m.lora_b @ m.lora_a
        x = torch.randn(3, delta.shape[1], dtype=torch.float64)  # PEFT's layer adds x Δᵀ: Δ is [d_out, d_in]
        torch.testing.assert_close(m.layer(x) - m.layer.base_layer(x), x @ delta.T)
        dense = art.block(m.name, dtype=torch.float64).dense()
        expected = expected + delta.reshape(-1) @ dense @ delta.reshape(-1)
    torch.testing.assert_close(reg().double(), 0.5 * 0.7 * expected.detach(), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_parameterization_fits_peft(arch: str) -> None:
    """The stored LoRA init has PEFT's shapes (Conv1D too) and its penalty starts at zero."""
    art = artifact(arch, "diag", parameterization="lora", lora_rank=2, lora_alpha=3.0)
    model = peft_model(arch, "all-linear")
    assert apply_lora_init(model, art) == len(art.manifest.modules)
    reg = LaplaceRegularizer.from_artifact(art, model, strength=1.0, mode="lora_init", on_unmatched="error")
    assert float(reg().detach()) == 0.0


def test_fingerprint_sees_a_changed_conv1d_weight() -> None:
    art = artifact("gpt2", "diag")
    model = peft_model("gpt2", "all-linear")
    with torch.no_grad():
        next(adapted_modules(model)).base_weight[0, 1] += 1.0  # the view writes through to the Conv1D
    with pytest.raises(ModelMismatchError, match="fingerprint"):
        LaplaceRegularizer.from_artifact(art, model, strength=1.0)


def input_keys(art: Artifact) -> dict[str, str]:
    return {name: module.blocks[0].input.key for name, module in art.manifest.modules.items()}


def recorded_inputs(arch: str) -> dict[str, torch.Tensor]:
    """Each target's input on the first batch, recorded by plain forward hooks."""
    model, seen = base(arch), {}

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            seen.setdefault(name, inputs[0])

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in select_targets(model, "all-linear").items()]
    try:
        model(input_ids=batches()[0]["input_ids"], attention_mask=batches()[0]["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("arch", ARCHS)
def test_input_sharing_follows_tensor_identity(arch: str) -> None:
    """Modules share an input covariance exactly when they read the same tensor object."""
    keys, inputs = input_keys(artifact(arch, "kron")), recorded_inputs(arch)
    for a in keys:
        for b in keys:
            assert (keys[a] == keys[b]) == (inputs[a] is inputs[b]), (a, b)


@pytest.mark.parametrize(
    ("arch", "groups"),
    [
        (
            "llama",
            [
                {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"},
                {"self_attn.o_proj"},
                {"mlp.gate_proj", "mlp.up_proj"},
                {"mlp.down_proj"},
            ],
        ),
        ("phi3", [{"self_attn.qkv_proj"}, {"self_attn.o_proj"}, {"mlp.gate_up_proj"}, {"mlp.down_proj"}]),
        ("gpt2", [{"attn.c_attn"}, {"attn.c_proj"}, {"mlp.c_fc"}, {"mlp.c_proj"}]),
    ],
)
def test_input_sharing_groups(arch: str, groups: list[set[str]]) -> None:
    """Layer 0's modules grouped by their stored input factor: q/k/v and gate/up share, fused modules do not."""
    found: dict[str, set[str]] = {}
    for name, key in input_keys(artifact(arch, "kron")).items():
        if ".0." in name:
            found.setdefault(key, set()).add(name.split(".0.", 1)[1])
    assert sorted(map(sorted, found.values())) == sorted(map(sorted, groups))


def test_a_module_that_is_not_linear_is_refused() -> None:
    with pytest.raises(LaplaceHubError, match=r"model.embed_tokens: Embedding is not a linear module"):
        linear_shape(nn.Embedding(4, 2), "model.embed_tokens")


def test_a_target_that_is_not_linear_is_refused_by_name() -> None:
    model = base("llama")
    options = ComputeOptions(parameterization="lora")
    with pytest.raises(LaplaceHubError, match=r"model.embed_tokens: Embedding is not a linear module"):
        compute_artifact(
            model,
            {"src": batches()},
            {"model.embed_tokens": model.model.embed_tokens},
            options,
            BaseModelInfo(repo_id="t"),
        )
