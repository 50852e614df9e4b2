"""Each baseline's defining property, on a tiny PEFT Llama."""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model

from laplace_hub.consumers import adapted_modules
from laplace_hub.data import pad_batch
from laplace_hub.evaluation.baselines import MIGU, FlatLoRA, milora_init
from tests.conftest import Words, tiny_llama

BATCH = pad_batch([[1, 2, 3, 4, 5], [6, 7, 8, 9]], 0)


def peft(rank: int = 2):
    return get_peft_model(
        copy.deepcopy(tiny_llama()), LoraConfig(r=rank, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    )


def test_milora_starts_at_the_base_model_from_minor_singular_directions() -> None:
    model = peft()
    weights = {m.name: m.base_weight.detach().clone() for m in adapted_modules(model)}
    before = model(**BATCH).logits.detach()
    assert milora_init(model) == 4
    torch.testing.assert_close(model(**BATCH).logits, before)
    for m in adapted_modules(model):
        merged = m.base_weight + m.scaling * m.lora_b @ m.lora_a
        torch.testing.assert_close(merged, weights[m.name])
        _, s, vh = torch.linalg.svd(weights[m.name], full_matrices=False)
        minor = vh[-2:]  # the A rows span exactly the 2 smallest right-singular directions
        torch.testing.assert_close(m.lora_a @ minor.T @ minor, m.lora_a)
        torch.testing.assert_close(torch.linalg.svdvals(m.scaling * m.lora_b @ m.lora_a)[:2], s[-2:])


def test_flat_lora_perturbs_during_the_step_and_restores_exactly() -> None:
    model = peft()
    flat = FlatLoRA(model, rho=0.05, seed=0)
    originals = [m.base_weight.detach().clone() for m in flat.modules]
    with flat.perturbed():
        noise = [m.base_weight.detach() - o for m, o in zip(flat.modules, originals, strict=True)]
        model(**BATCH).loss.backward()
    for m, o, n in zip(flat.modules, originals, noise, strict=True):
        assert torch.equal(m.base_weight, o)
        expected = 0.05 * o.norm(dim=1) / o.shape[1] ** 0.5  # B = 0: the merged weight is the base
        measured = n.std(dim=1)
        assert torch.allclose(measured.mean(), expected.mean(), rtol=0.35)
    assert all(m.lora_b.grad is not None for m in flat.modules)


def test_migu_updates_only_the_top_rows() -> None:
    model = peft()
    with torch.no_grad():
        for m in adapted_modules(model):
            m.lora_b.normal_()
    migu = MIGU(model, fraction=0.25)
    model(**BATCH).loss.backward()
    migu.mask_gradients()
    for index, m in enumerate(migu.modules):
        rows = (m.lora_b.grad.abs().sum(1) > 0).nonzero().flatten()
        keep = max(1, -(-m.lora_b.shape[0] // 4))
        assert len(rows) <= keep
        assert set(rows.tolist()) <= set(migu.magnitudes[index].topk(keep).indices.tolist())
    migu.remove()


def test_sweep_runs_each_baseline() -> None:
    from laplace_hub.evaluation.sweep import OWN_GRIDS, SweepConfig, finetune
    from laplace_hub.evaluation.tasks import Example

    train = [Example(f"q {i}", f" a{i}") for i in range(8)]
    for method in ("milora", "flat_lora", "migu"):
        model, _ = finetune(
            tiny_llama().float(),
            Words(),
            train,
            method,
            OWN_GRIDS[method][-1],
            {},
            SweepConfig(steps=2, batch_size=4, targets="q_proj"),
            seed=0,
        )
        assert any(p.requires_grad for p in model.parameters())
