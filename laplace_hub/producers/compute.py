"""Data in, artifact out: run the model over source batches with the hooks, normalise, build blocks."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from laplace_hub.artifact import Artifact, ArtifactBuilder
from laplace_hub.artifact.store import tensor_dtype
from laplace_hub.curvature import Block, DenseFactor, DiagBlock, Factor, KronBlock, LoraPairBlock, WeightBlock
from laplace_hub.curvature.sketch import diag_lowrank_from_sketch
from laplace_hub.errors import DataError, LaplaceHubError
from laplace_hub.fingerprint import fingerprint_weights
from laplace_hub.manifest import (
    BaseModelInfo,
    DatasetInfo,
    Estimator,
    LoraParameterization,
    WeightParameterization,
)
from laplace_hub.numerics import at_least_float32
from laplace_hub.producers.accumulate import CurvatureAccumulator, LoraInit
from laplace_hub.producers.distributed import all_reduce_sums, rank_and_world

Batch = Mapping[str, Tensor]


@dataclass(frozen=True)
class ComputeOptions:
    """What to compute (SPEC.md §4, §6). ``structure`` ``kron_tridiag`` needs ``lora``.

    ``diag_lowrank`` keeps the top ``lowrank_rank`` eigen-directions of the per-example Fisher,
    found by a Nyström sketch of ``lowrank_rank + sketch_oversample`` random directions.
    """

    structure: Literal["diag", "diag_lowrank", "kron", "kron_tridiag"] = "kron"
    estimator: Literal["empirical", "mc", "batch_empirical"] = "empirical"
    mc_samples: int = 1
    normalization: Literal["per_sequence", "per_token"] = "per_sequence"
    kfac_approx: Literal["expand", "reduce"] = "expand"
    eig_rank: int | None = None
    lowrank_rank: int = 8
    sketch_oversample: int = 8
    parameterization: Literal["weight", "lora"] = "weight"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    use_rslora: bool = False
    per_dataset: bool = False
    seed: int = 0
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"
    accumulate_dtype: torch.dtype = torch.float32
    packed: bool = False
    license: str | None = None

    @property
    def compute_dtype(self) -> torch.dtype:
        """The accumulation dtype, never below the stored one (a float64 artifact is computed in float64)."""
        return torch.promote_types(self.accumulate_dtype, tensor_dtype(self.dtype))

    def check(self) -> None:
        """Refuse combinations the spec or the estimators do not define."""
        if self.structure == "kron_tridiag" and self.parameterization != "lora":
            raise LaplaceHubError("structure kron_tridiag needs --parameterization lora")
        if self.estimator == "batch_empirical" and self.structure != "diag":
            raise LaplaceHubError("the batch_empirical estimator (the paper's) is defined for diag only")
        if self.structure == "diag_lowrank" and (self.lowrank_rank < 1 or self.sketch_oversample < 0):
            raise LaplaceHubError("diag_lowrank needs --rank ≥ 1 directions and a non-negative oversampling")
        if self.kfac_approx == "reduce" and self.normalization == "per_token":
            raise LaplaceHubError("kfac_approx reduce aggregates over a sequence; per_token needs expand")
        if self.eig_rank is not None and (self.structure != "kron" or self.parameterization != "weight"):
            raise LaplaceHubError("--rank (eigen-truncation) applies to weight-space kron only")


def lora_scaling(options: ComputeOptions) -> float:
    """``s = α/r``, or ``α/√r`` with rsLoRA (as PEFT)."""
    root = math.sqrt(options.lora_rank) if options.use_rslora else options.lora_rank
    return options.lora_alpha / root


def lora_inits(modules: Mapping[str, nn.Linear], options: ComputeOptions) -> dict[str, LoraInit]:
    """PEFT's default init (``A`` Kaiming-uniform with a=√5, ``B = 0``), drawn from ``options.seed``."""
    gen = torch.Generator().manual_seed(options.seed)
    inits = {}
    for name, module in modules.items():
        a = torch.empty(options.lora_rank, module.in_features)
        bound = 1 / math.sqrt(module.in_features)  # kaiming_uniform_(a=√5) on a fan_in-wide matrix
        a.uniform_(-bound, bound, generator=gen)
        inits[name] = LoraInit(a, torch.zeros(module.out_features, options.lora_rank), lora_scaling(options))
    return inits


@dataclass
class _Counts:
    sequences: int = 0
    tokens: int = 0
    batches: int = 0


def _sample_labels(probs: Tensor, valid: Tensor, gen: torch.Generator) -> Tensor:
    """Labels drawn from the model's predictive at labelled positions only (-100 elsewhere)."""
    sampled = torch.multinomial(probs, 1, generator=gen).reshape(valid.shape).to(valid.device)
    return torch.where(valid, sampled, -100)


def _backward_batch(
    model: nn.Module, batch: Batch, acc: CurvatureAccumulator, options: ComputeOptions, gen: torch.Generator
) -> tuple[int, int]:
    """Forward once, backward once per label draw; returns (sequences, tokens) that carried labels."""
    device = next(model.parameters()).device
    input_ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
    targets = labels[:, 1:]
    valid = targets != -100
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = valid
    acc.new_batch(mask)
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device)).logits[:, :-1]
    log_probs = torch.log_softmax(at_least_float32(logits), -1)
    draws = options.mc_samples if options.estimator == "mc" else 1
    if options.estimator == "mc":  # the predictive once per batch; the generator lives on the CPU
        probs = log_probs.detach().exp().reshape(-1, log_probs.shape[-1]).cpu()
    for draw in range(draws):
        y = _sample_labels(probs, valid, gen) if options.estimator == "mc" else targets
        log_lik = (log_probs.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1) * valid).sum()
        acc.collect_inputs = draw == 0
        log_lik.backward(retain_graph=draw < draws - 1)
    return int(valid.any(1).sum()), int(valid.sum())


def _accumulate(
    model: nn.Module,
    batches: Sequence[Batch],
    acc: CurvatureAccumulator,
    options: ComputeOptions,
    counts: _Counts,
    label: str,
) -> None:
    rank, world = rank_and_world()
    gen = torch.Generator().manual_seed(options.seed + 1000 * rank)
    if len(batches) < world:
        raise DataError(f"dataset {label!r} has {len(batches)} batch(es) for {world} processes; give each one")
    mine = [b for i, b in enumerate(batches) if i % world == rank]
    bar = tqdm(mine, desc=f"curvature [{label}]", unit="batch", disable=rank != 0, leave=False)
    start = time.perf_counter()
    for batch in bar:
        sequences, tokens = _backward_batch(model, batch, acc, options, gen)
        counts.sequences += sequences
        counts.tokens += tokens
        counts.batches += 1
        bar.set_postfix(tokens=counts.tokens, tokens_per_s=round(counts.tokens / (time.perf_counter() - start)))


def diagonal_block(
    acc: CurvatureAccumulator, name: str, param: str, scale: float, options: ComputeOptions
) -> WeightBlock:
    """The diag or diag_lowrank block of one parameter from its sums."""
    diagonal = acc.sums[(name, param)] * scale
    if options.structure == "diag":
        return DiagBlock(diagonal)
    sketch = acc.sums[(name, param, "sketch")] * scale
    return diag_lowrank_from_sketch(diagonal, sketch, acc.directions[(name, param)], options.lowrank_rank)


def _blocks(
    acc: CurvatureAccumulator, counts: _Counts, options: ComputeOptions, inits: Mapping[str, LoraInit]
) -> dict[str, Block]:
    """Normalise the sums (SPEC.md §6) and make one block per module."""
    draws = options.mc_samples if options.estimator == "mc" else 1
    per_unit = counts.sequences if options.normalization == "per_sequence" else counts.tokens
    out_scale = 1.0 / (per_unit * draws)
    in_scale = 1.0 / (counts.sequences if options.kfac_approx == "reduce" else counts.tokens)
    inputs: dict[str, Factor] = {}
    blocks: dict[str, Block] = {}
    for name in acc.modules:
        if options.structure.startswith("diag"):
            params = [
                diagonal_block(acc, name, p, out_scale, options)
                for p in (("lora_A", "lora_B") if name in inits else ("weight",))
            ]
            blocks[name] = LoraPairBlock(params[0], params[1]) if name in inits else params[0]
            continue
        owner = acc.input_owner[name]
        if owner not in inputs:
            factor: Factor = DenseFactor(acc.sums[(owner, "input")] * in_scale)
            inputs[owner] = factor.compress(options.eig_rank) if options.eig_rank else factor
        output: Factor = DenseFactor(acc.sums[(name, "output")] * out_scale)
        kron = KronBlock(inputs[owner], output.compress(options.eig_rank) if options.eig_rank else output)
        if name in inits:
            init = inits[name]
            a, b = init.a.to(options.compute_dtype), init.b.to(options.compute_dtype)
            blocks[name] = kron.project_lora(a, b, init.scaling, cross=options.structure == "kron_tridiag")
        else:
            blocks[name] = kron
    return blocks


def compute_artifact(
    model: nn.Module,
    datasets: Mapping[str, Sequence[Batch]],
    targets: Mapping[str, nn.Linear],
    options: ComputeOptions,
    base_model: BaseModelInfo,
    sources: Mapping[str, str] | None = None,
) -> Artifact:
    """Compute a curvature artifact for ``targets`` of a causal LM on named source datasets.

    Args:
        model: A causal LM whose forward takes ``input_ids`` and ``attention_mask`` and returns
            ``.logits``.
        datasets: Dataset name → batches (``input_ids``, ``attention_mask``, ``labels`` with -100
            where no label counts).
        targets: Module name → the ``nn.Linear`` to cover.
        options: What to compute.
        base_model: Identity of the base model (the fingerprint is filled in here).
        sources: Dataset name → where it came from, for the manifest.

    Returns:
        An in-memory artifact; under ``torch.distributed`` every rank gets the reduced result.

    """
    options.check()
    if not targets:
        raise LaplaceHubError("no target modules selected; check --targets")
    inits = lora_inits(targets, options) if options.parameterization == "lora" else {}
    requires = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for module in targets.values():
        module.weight.requires_grad_(True)
    model.eval()
    groups = {name: [name] for name in datasets} if options.per_dataset else {None: list(datasets)}
    builder = ArtifactBuilder(dtype=options.dtype, packed=options.packed)
    infos = []
    try:
        for group, names in groups.items():
            acc = CurvatureAccumulator(
                dict(targets),
                "diag" if options.structure.startswith("diag") else "kron",
                options.normalization,
                options.kfac_approx,
                batch_gradient=options.estimator == "batch_empirical",
                lora=inits if options.structure.startswith("diag") else {},
                sketch_size=options.lowrank_rank + options.sketch_oversample
                if options.structure == "diag_lowrank"
                else 0,
                seed=options.seed,
                dtype=options.compute_dtype,
            )
            acc.attach()
            per_name = {}
            try:
                for name in names:
                    per_name[name] = _Counts()
                    _accumulate(model, datasets[name], acc, options, per_name[name], name)
            finally:
                acc.detach()
            counts = all_reduce_sums(acc.sums, per_name)
            total = _Counts(*(sum(getattr(c, f) for c in counts.values()) for f in ("sequences", "tokens", "batches")))
            if total.tokens == 0:
                raise DataError(f"dataset(s) {', '.join(names)} hold no labelled tokens")
            for target, block in _blocks(acc, total, options, inits).items():
                d_out, d_in = targets[target].weight.shape
                builder.add(target, (int(d_out), int(d_in)), block, group)
            infos += [
                DatasetInfo(
                    name=n, sequences=c.sequences, tokens=c.tokens, batches=c.batches, source=(sources or {}).get(n)
                )
                for n, c in counts.items()
            ]
    finally:
        for p, flag in requires.items():
            p.requires_grad_(flag)
    for name, init in inits.items():
        builder.set_lora_init(name, init.a, init.b)
    parameterization = (
        LoraParameterization(
            kind="lora",
            rank=options.lora_rank,
            alpha=options.lora_alpha,
            use_rslora=options.use_rslora,
            init_method="kaiming_uniform",
            init_seed=options.seed,
        )
        if options.parameterization == "lora"
        else WeightParameterization(kind="weight")
    )
    fingerprint = fingerprint_weights({name: module.weight for name, module in targets.items()})
    return builder.build(
        base_model=base_model.model_copy(update={"fingerprint": fingerprint}),
        parameterization=parameterization,
        estimator=Estimator(
            kind=options.estimator,
            mc_samples=options.mc_samples if options.estimator == "mc" else None,
            seed=options.seed,
        ),
        loss="cross_entropy",
        normalization=options.normalization,
        kfac_approx=None if options.structure.startswith("diag") else options.kfac_approx,
        datasets=infos,
        datasets_combined="separate" if options.per_dataset else "summed",
        license=options.license,
    )
