"""A model that accelerate spreads over CPU and disk gives the artifact of the plain model.

Offloaded weights sit on the meta device outside a forward; accelerate loads them for each
forward, so gradients flow as usual, and the fingerprint loads one module's weight at a time.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from laplace_hub.errors import LaplaceHubError
from laplace_hub.linear import full_weight
from laplace_hub.manifest import BaseModelInfo
from laplace_hub.models import select_targets
from laplace_hub.producers import ComputeOptions, compute_artifact
from laplace_hub.producers.plan import PassPlan
from tests.conftest import tiny_llama
from tests.integration.test_distributed import batches

accelerate = pytest.importorskip("accelerate")

TARGETS = "q_proj,v_proj,down_proj"
TWO_PASSES = PassPlan(  # requires_grad changes between passes on weights accelerate swaps in and out
    groups=(
        ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"),
        ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.0.mlp.down_proj"),
    ),
    group_bytes=(0, 0),
)


def offloaded(tmp_path: Path, how: str) -> nn.Module:
    if how == "cpu_offload":  # every module's weights in a CPU state dict, loaded per forward
        return accelerate.cpu_offload(tiny_llama(), execution_device=torch.device("cpu"))
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "tiny")
    device_map = {  # the embedding, layer 0 and the head on disk, the rest in memory
        "model.embed_tokens": "disk",
        "model.layers.0": "disk",
        "model.layers.1": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "disk",
    }
    return AutoModelForCausalLM.from_pretrained(
        tmp_path / "tiny", dtype=torch.float64, device_map=device_map, offload_folder=tmp_path / "offload"
    )


@pytest.mark.parametrize("structure", ["kron", "diag_lowrank"])
@pytest.mark.parametrize("how", ["device_map", "cpu_offload"])
def test_offloaded_model_gives_the_plain_artifact(tmp_path: Path, how: str, structure: str) -> None:
    options = ComputeOptions(structure=structure, accumulate_dtype=torch.float64, dtype="float64")  # type: ignore[arg-type]
    plain = tiny_llama()
    base = BaseModelInfo(repo_id="t")
    one = compute_artifact(plain, {"src": batches()}, select_targets(plain, TARGETS), options, base)
    model = offloaded(tmp_path, how)
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert q.weight.is_meta  # offloaded indeed
    flags = {name: not p.requires_grad for name, p in model.named_parameters()}  # flipped, to see them restored
    for name, flag in flags.items():
        model.get_parameter(name).requires_grad_(flag)
    two = compute_artifact(model, {"src": batches()}, select_targets(model, TARGETS), options, base, plan=TWO_PASSES)
    assert two.manifest.base_model.fingerprint == one.manifest.base_model.fingerprint
    assert two.manifest.datasets == one.manifest.datasets
    for name in one.manifest.modules:
        torch.testing.assert_close(
            two.block(name, dtype=torch.float64).dense(), one.block(name, dtype=torch.float64).dense()
        )
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert q.weight.is_meta and q.weight.grad is None  # still offloaded, no gradient kept
    torch.testing.assert_close(full_weight(q), plain.get_submodule("model.layers.0.self_attn.q_proj").weight)


def test_weight_offloaded_by_a_parent_hook_is_refused_by_name() -> None:
    # preload_module_classes: the attention block's hook loads q, k, v, o together; q has no hook of its own
    model = accelerate.cpu_offload(
        tiny_llama(), execution_device=torch.device("cpu"), preload_module_classes=["LlamaAttention"]
    )
    with pytest.raises(LaplaceHubError, match="meta device") as caught:
        compute_artifact(
            model, {"src": batches()}, select_targets(model, "q_proj"), ComputeOptions(), BaseModelInfo(repo_id="t")
        )
    assert caught.value.location == "model.layers.0.self_attn.q_proj"
