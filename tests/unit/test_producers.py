"""Producers against brute force (torch.func per-example gradients) on a tiny Llama, in float64."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad
from transformers import LlamaForCausalLM

from laplace_hub.curvature import DiagBlock, DiagLowRankBlock, KronBlock, LoraPairBlock
from laplace_hub.data import pad_batch
from laplace_hub.errors import LaplaceHubError
from laplace_hub.manifest import BaseModelInfo
from laplace_hub.models import select_targets
from laplace_hub.producers import ComputeOptions, compute_artifact
from laplace_hub.producers.compute import lora_inits
from laplace_hub.validate import validate
from tests.conftest import tiny_llama

TARGETS = "q_proj,v_proj,down_proj"


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, 23, (n,), generator=gen).tolist() for n in (5, 3, 6, 2, 4)]
    # padding, and a masked "prompt" token in each sequence of the second batch
    return [pad_batch(seqs[:3], 0), pad_batch(seqs[3:], 0, prompt_lengths=[1, 1])]


def sequence_log_lik(model, params, input_ids, labels) -> torch.Tensor:
    logits = functional_call(model, params, (input_ids.unsqueeze(0),)).logits[0, :-1]
    targets = labels[1:]
    valid = targets != -100
    log_probs = torch.log_softmax(logits, -1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (log_probs * valid).sum()


def sequences(batches):
    for batch in batches:
        for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True):
            n = int(mask.sum())
            yield ids[:n], labels[:n]


def per_sequence_grads(model, batches, names, overrides=None):
    """Brute force: torch.func.grad of each sequence's log-likelihood, one sequence at a time."""
    base = dict(model.named_parameters())
    for ids, labels in sequences(batches):

        def f(p, ids=ids, labels=labels):
            return sequence_log_lik(model, {**base, **p}, ids, labels)

        params = overrides(base) if overrides else {f"{n}.weight": base[f"{n}.weight"] for n in names}
        yield grad(f)(params), int((labels[1:] != -100).sum())


def run(model, batches, **kw) -> object:
    targets = select_targets(model, TARGETS)
    options = ComputeOptions(accumulate_dtype=torch.float64, dtype="float64", **kw)
    return compute_artifact(model, {"src": batches}, targets, options, BaseModelInfo(repo_id="tiny"))


def test_diag_per_sequence_equals_brute_force(model, batches) -> None:
    art = run(model, batches, structure="diag")
    names = list(art.manifest.modules)
    grads = list(per_sequence_grads(model, batches, names))
    for name in names:
        expected = torch.stack([g[f"{name}.weight"].square() for g, _ in grads]).mean(0)
        torch.testing.assert_close(art.block(name, dtype=torch.float64).diagonal, expected)
    assert art.manifest.datasets[0].sequences == 5
    assert art.manifest.datasets[0].tokens == 4 + 2 + 5 + 1 + 3  # padding and masked prompts excluded


def test_batch_empirical_is_squared_batch_gradient(model, batches) -> None:
    art = run(model, batches, structure="diag", estimator="batch_empirical")
    name = "model.layers.0.self_attn.q_proj"
    grads = [g[f"{name}.weight"] for g, _ in per_sequence_grads(model, batches, [name])]
    expected = (sum(grads[:3]).square() + sum(grads[3:]).square()) / 5
    torch.testing.assert_close(art.block(name, dtype=torch.float64).diagonal, expected)


def per_token_grads(model, batches, name):
    """Brute force: the gradient of each labelled token's log-likelihood, one token at a time."""
    base = dict(model.named_parameters())
    for ids, labels in sequences(batches):
        for t in range(1, len(ids)):
            if labels[t] == -100:
                continue
            one = torch.full_like(labels, -100)
            one[t] = labels[t]
            yield grad(lambda w, one=one, ids=ids: sequence_log_lik(model, {**base, f"{name}.weight": w}, ids, one))(
                base[f"{name}.weight"]
            )


def test_diag_per_token_equals_brute_force(model, batches) -> None:
    art = run(model, batches, structure="diag", normalization="per_token")
    name = "model.layers.1.mlp.down_proj"
    squares = [g.square() for g in per_token_grads(model, batches, name)]
    torch.testing.assert_close(art.block(name, dtype=torch.float64).diagonal, torch.stack(squares).mean(0))


def exact_diag_lowrank(grads: list[torch.Tensor], rank: int) -> torch.Tensor:
    """Brute force: D + UUᵀ from the exact eigendecomposition of the dense mean outer product."""
    g = torch.stack([x.reshape(-1) for x in grads])
    fisher = g.T @ g / len(grads)
    values, vectors = torch.linalg.eigh(fisher)
    top = vectors[:, -rank:] * values[-rank:].clamp_min(0).sqrt()
    low = top @ top.T
    return torch.diag(torch.diagonal(fisher) - torch.diagonal(low)) + low


def test_diag_lowrank_per_sequence_is_the_exact_top_eigenspace(model, batches) -> None:
    """With a sketch wider than the 5 sequences (rank F ≤ 5) the Nyström sketch is exact."""
    art = run(model, batches, structure="diag_lowrank", lowrank_rank=3, sketch_oversample=4)
    names = list(art.manifest.modules)
    grads = list(per_sequence_grads(model, batches, names))
    for name in names:
        block = art.block(name, dtype=torch.float64)
        assert isinstance(block, DiagLowRankBlock) and block.rank == 3
        torch.testing.assert_close(block.dense(), exact_diag_lowrank([g[f"{name}.weight"] for g, _ in grads], 3))
    assert art.manifest.spec_version == "1.3"  # diag_lowrank is 1.1, its v2 fingerprint 1.3
    assert validate_in_memory(art)


def test_diag_lowrank_per_token_is_the_exact_top_eigenspace(model, batches) -> None:
    art = run(model, batches, structure="diag_lowrank", normalization="per_token", lowrank_rank=2, sketch_oversample=14)
    name = "model.layers.1.mlp.down_proj"
    expected = exact_diag_lowrank(list(per_token_grads(model, batches, name)), 2)  # 15 tokens ≤ 16 directions
    torch.testing.assert_close(art.block(name, dtype=torch.float64).dense(), expected)


def test_diag_lowrank_sketch_smaller_than_the_data_still_bounds_the_fisher(model, batches) -> None:
    """A narrow sketch is approximate, but D + UUᵀ keeps F's diagonal and never exceeds F (UUᵀ ⪯ F)."""
    art = run(model, batches, structure="diag_lowrank", lowrank_rank=1, sketch_oversample=1)
    name = "model.layers.0.self_attn.q_proj"
    grads = [g[f"{name}.weight"].reshape(-1) for g, _ in per_sequence_grads(model, batches, [name])]
    fisher = torch.stack(grads).T @ torch.stack(grads) / len(grads)
    block = art.block(name, dtype=torch.float64)
    torch.testing.assert_close(torch.diagonal(block.dense()), torch.diagonal(fisher))
    low = block.lowrank.reshape(1, -1)
    assert torch.linalg.eigvalsh(fisher - low.T @ low).min() > -1e-10


def test_lora_diag_lowrank_equals_brute_force_lora_fisher(model, batches) -> None:
    art = run(
        model,
        batches,
        structure="diag_lowrank",
        parameterization="lora",
        lora_rank=2,
        lora_alpha=4.0,
        lowrank_rank=2,
        sketch_oversample=4,
    )
    name = "model.layers.0.self_attn.v_proj"
    a0, b0 = (t.double() for t in art.lora_init(name))
    grads = [g[f"{name}.weight"] for g, _ in per_sequence_grads(model, batches, [name])]
    pair = art.block(name, dtype=torch.float64)
    assert isinstance(pair, LoraPairBlock) and isinstance(pair.b, DiagLowRankBlock)
    torch.testing.assert_close(pair.b.dense(), exact_diag_lowrank([2.0 * g @ a0.T for g in grads], 2))
    assert torch.count_nonzero(pair.a.dense()) == 0 and torch.count_nonzero(b0) == 0  # B₀ = 0: no curvature on A
    assert validate_in_memory(art)


def positions(model, batches, name):
    """Independent K-FAC ingredients: inputs from a forward hook, output gradients by autograd.grad
    of each sequence's log-likelihood with respect to a zero probe added to the module's output."""
    module = dict(model.named_modules())[name]
    for ids, labels in sequences(batches):
        seen = {}

        def hook(mod, inputs, output, seen=seen):
            seen["x"] = inputs[0][0]
            seen["probe"] = torch.zeros_like(output, requires_grad=True)
            return output + seen["probe"]

        handle = module.register_forward_hook(hook)
        try:
            log_lik = sequence_log_lik(model, dict(model.named_parameters()), ids, labels)
            (g,) = torch.autograd.grad(log_lik, seen["probe"])
        finally:
            handle.remove()
        valid = torch.zeros(len(ids), dtype=torch.bool)
        valid[:-1] = labels[1:] != -100
        yield seen["x"].detach()[valid], g[0][valid]


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kron_factors_equal_independent_reference(model, batches, approx: str) -> None:
    art = run(model, batches, structure="kron", kfac_approx=approx)
    for name in art.manifest.modules:
        xs, gs = zip(*positions(model, batches, name), strict=True)
        n, tokens = len(xs), sum(len(x) for x in xs)
        if approx == "expand":
            sx = sum(x.T @ x for x in xs) / tokens
            sg = sum(g.T @ g for g in gs) / n
        else:
            sx = sum(torch.outer(x.mean(0), x.mean(0)) for x in xs) / n
            sg = sum(torch.outer(g.sum(0), g.sum(0)) for g in gs) / n
        block = art.block(name, dtype=torch.float64)
        torch.testing.assert_close(block.input.dense(), sx)
        torch.testing.assert_close(block.output.dense(), sg)


def test_qkv_share_one_stored_input_factor(model, batches) -> None:
    art = run(model, batches, structure="kron")
    modules = art.manifest.modules
    q = modules["model.layers.0.self_attn.q_proj"].blocks[0]
    v = modules["model.layers.0.self_attn.v_proj"].blocks[0]
    assert q.input.key == v.input.key
    assert validate_in_memory(art)


def validate_in_memory(art) -> bool:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        art.save(Path(tmp) / "a")
        report = validate(Path(tmp) / "a")
        assert report.valid, [f.line() for f in report.findings]
    return True


def test_lora_diag_equals_brute_force_lora_fisher(model, batches) -> None:
    options = dict(structure="diag", parameterization="lora", lora_rank=2, lora_alpha=4.0)
    art = run(model, batches, **options)
    name = "model.layers.0.self_attn.v_proj"
    a0, b0 = art.lora_init(name)
    a0, b0 = a0.double(), torch.randn_like(b0.double())  # B₀ = 0 makes A's Fisher vanish; check the general formula too
    inits = {name: (a0.double(), b0.double())}

    def overrides(base):
        return {"A": inits[name][0], "B": inits[name][1]}

    s = 2.0
    base = dict(model.named_parameters())
    squares_a, squares_b = [], []
    for ids, labels in sequences(batches):

        def f(p, ids=ids, labels=labels):
            # the forward stays at W (as in the hooks) while the gradient is taken at (A₀, B₀)
            weight = base[f"{name}.weight"] + s * (p["B"] @ p["A"] - b0 @ a0.double())
            return sequence_log_lik(model, {**base, f"{name}.weight": weight}, ids, labels)

        g = grad(f)(overrides(base))
        squares_a.append(g["A"].square())
        squares_b.append(g["B"].square())
    from laplace_hub.producers.accumulate import CurvatureAccumulator, LoraInit

    targets = select_targets(model, TARGETS)
    acc = CurvatureAccumulator(
        {name: targets[name]}, "diag", "per_sequence", dtype=torch.float64, lora={name: LoraInit(a0.double(), b0, s)}
    )
    from laplace_hub.producers.compute import ComputeOptions as Opt
    from laplace_hub.producers.compute import _accumulate, _Counts

    counts = _Counts()
    acc.attach()
    _accumulate(model, batches, acc, Opt(), counts, "src")
    acc.detach()
    sums = acc.result()[name].parameters
    torch.testing.assert_close(sums["lora_A"].diagonal / 5, torch.stack(squares_a).mean(0))
    torch.testing.assert_close(sums["lora_B"].diagonal / 5, torch.stack(squares_b).mean(0))
    pair = art.block(name, dtype=torch.float64)
    assert isinstance(pair, LoraPairBlock) and isinstance(pair.a, DiagBlock)
    assert torch.count_nonzero(pair.a.diagonal) == 0  # B₀ = 0: A carries no curvature at init


@pytest.mark.parametrize("structure", ["kron", "kron_tridiag"])
def test_lora_kron_blocks_are_projections_of_weight_blocks(model, batches, structure: str) -> None:
    weight = run(model, batches, structure="kron")
    lora = run(model, batches, structure=structure, parameterization="lora", lora_rank=2, lora_alpha=4.0)
    for name in weight.manifest.modules:
        a0, b0 = lora.lora_init(name)
        expected = weight.block(name, dtype=torch.float64).project_lora(
            a0.double(), b0.double(), 2.0, cross=structure == "kron_tridiag"
        )
        torch.testing.assert_close(lora.block(name, dtype=torch.float64).dense(), expected.dense())
    assert validate_in_memory(lora)


def test_mc_samples_only_valid_positions_and_scales_by_draws(model, batches) -> None:
    one = run(model, batches, structure="kron", estimator="mc", mc_samples=1, seed=3)
    many = run(model, batches, structure="kron", estimator="mc", mc_samples=64, seed=3)
    emp = run(model, batches, structure="kron")
    name = "model.layers.1.self_attn.q_proj"
    # inputs do not depend on labels; outputs are a mean over draws (same order of magnitude)
    torch.testing.assert_close(one.block(name).input.dense(), emp.block(name).input.dense())
    ratio = many.block(name).output.dense().trace() / one.block(name).output.dense().trace()
    assert 0.2 < float(ratio) < 5
    assert many.manifest.estimator.mc_samples == 64


def test_per_dataset_blocks_and_counts(model, batches) -> None:
    targets = select_targets(model, "q_proj")
    options = ComputeOptions(structure="diag", per_dataset=True, accumulate_dtype=torch.float64, dtype="float64")
    art = compute_artifact(model, {"a": batches[:1], "b": batches[1:]}, targets, options, BaseModelInfo(repo_id="t"))
    assert [d.name for d in art.manifest.datasets] == ["a", "b"]
    assert [d.sequences for d in art.manifest.datasets] == [3, 2]
    pooled = run(model, batches, structure="diag")
    name = "model.layers.0.self_attn.q_proj"
    combined = art.block(name, "a").diagonal * 3 + art.block(name, "b").diagonal * 2
    torch.testing.assert_close(combined / 5, pooled.block(name).diagonal.float())


def test_fingerprint_and_bad_options(model, batches) -> None:
    art = run(model, batches, structure="diag")
    assert art.manifest.base_model.fingerprint is not None
    with pytest.raises(LaplaceHubError, match="kron_tridiag needs"):
        run(model, batches, structure="kron_tridiag")
    with pytest.raises(LaplaceHubError, match="diag only"):
        run(model, batches, structure="kron", estimator="batch_empirical")
    with pytest.raises(LaplaceHubError, match="match no linear module"):
        select_targets(model, "nope_proj")
    assert "lm_head" not in select_targets(model, "all-linear")
    assert isinstance(
        run(model, batches, structure="kron", eig_rank=2).block("model.layers.0.self_attn.q_proj"), KronBlock
    )


def test_lora_init_is_peft_like(model) -> None:
    targets = select_targets(model, "q_proj")
    inits = lora_inits(targets, ComputeOptions(parameterization="lora", lora_rank=4))
    init = next(iter(inits.values()))
    assert init.a.abs().max() <= 1 / 8**0.5 and torch.count_nonzero(init.b) == 0 and init.scaling == 4.0
