"""Mask-the-Target against a brute-force per-position computation, in float64."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from laplace_hub.consumers.mask_the_target import MaskTheTarget, mask_the_target_kl
from laplace_hub.data import pad_batch
from laplace_hub.errors import ModelMismatchError
from tests.conftest import Words, tiny_llama


def brute_force(base_logits, logits, labels) -> float:
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            p = torch.softmax(base_logits[b, t].double(), -1)
            q = torch.softmax(logits[b, t].double(), -1)
            keep = [v for v in range(p.shape[0]) if v != y]
            p_t, q_t = p[keep] / p[keep].sum(), q[keep] / q[keep].sum()
            total += float((p_t * (p_t.log() - q_t.log())).sum())
            count += 1
    return total / count


def test_kl_over_non_target_vocabulary_equals_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    base, adapted = torch.randn(2, 5, 7, generator=gen), torch.randn(2, 5, 7, generator=gen)
    labels = torch.tensor([[1, 2, 3, 4, -100], [-100, 5, 6, 0, 1]])
    assert float(mask_the_target_kl(base, adapted, labels)) == pytest.approx(
        brute_force(base, adapted, labels), rel=1e-5
    )


def test_gradient_does_not_touch_the_target_logit() -> None:
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(1, 4, 6, generator=gen)
    adapted = torch.randn(1, 4, 6, generator=gen, requires_grad=True)
    labels = torch.tensor([[0, 2, 5, 1]])
    (grad,) = torch.autograd.grad(mask_the_target_kl(base, adapted, labels), adapted)
    for t, y in enumerate(labels[0, 1:].tolist()):
        assert grad[0, t, y] == 0
    assert grad.abs().sum() > 0


def test_regulariser_on_a_peft_model() -> None:
    base = tiny_llama()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    batch = pad_batch([[1, 2, 3, 4, 5], [6, 7, 8]], 0)
    reg = MaskTheTarget(model, strength=2.0)
    assert float(reg(batch, model(**batch).logits)) == pytest.approx(0.0, abs=1e-12)  # B = 0: same model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    logits = model(**batch).logits
    expected = 2.0 * brute_force(base(**batch).logits, logits.detach(), batch["labels"])
    assert float(reg(batch, logits)) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ModelMismatchError, match="PEFT"):
        MaskTheTarget(base, strength=1.0)


def test_sweep_runs_mask_the_target() -> None:
    from laplace_hub.evaluation.sweep import SweepConfig, finetune
    from laplace_hub.evaluation.tasks import Example

    train = [Example(f"q {i}", f" a{i}") for i in range(8)]
    model, seconds = finetune(
        tiny_llama().float(),
        Words(),
        train,
        "mtt",
        1.0,
        {},
        SweepConfig(steps=2, batch_size=4, targets="q_proj"),
        seed=0,
    )
    assert seconds > 0 and any("lora_B" in n for n, _ in model.named_parameters())
