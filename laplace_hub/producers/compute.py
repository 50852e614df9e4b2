"""Data in, artifact out: run the model over source batches with the hooks, make blocks, build the artifact."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from laplace_hub.artifact import Artifact, ArtifactBuilder
from laplace_hub.curvature import Block
from laplace_hub.errors import DataError, LaplaceHubError
from laplace_hub.fingerprint import fingerprint_modules
from laplace_hub.linear import linear_shape
from laplace_hub.manifest import (
    BaseModelInfo,
    DatasetInfo,
    Estimator,
    LoraParameterization,
    WeightParameterization,
)
from laplace_hub.numerics import at_least_float32
from laplace_hub.producers.accumulate import CurvatureAccumulator, LoraInit
from laplace_hub.producers.blocks import make_blocks
from laplace_hub.producers.distributed import all_reduce_sums, input_device, rank_and_world
from laplace_hub.producers.options import ComputeOptions, CurvatureOptions, LoraOptions
from laplace_hub.producers.plan import PassPlan
from laplace_hub.progress import progress

Batch = Mapping[str, Tensor]
logger = logging.getLogger(__name__)


def lora_scaling(options: LoraOptions) -> float:
    """``s = α/r``, or ``α/√r`` with rsLoRA (as PEFT)."""
    root = math.sqrt(options.lora_rank) if options.use_rslora else options.lora_rank
    return options.lora_alpha / root


def lora_inits(modules: Mapping[str, nn.Linear], options: ComputeOptions) -> dict[str, LoraInit]:
    """PEFT's default init (``A`` Kaiming-uniform with a=√5, ``B = 0``), drawn from ``options.seed``."""
    gen = torch.Generator().manual_seed(options.seed)
    inits = {}
    for name, module in modules.items():
        d_out, d_in = linear_shape(module, name)
        a = torch.empty(options.lora_rank, d_in)
        bound = 1 / math.sqrt(d_in)  # kaiming_uniform_(a=√5) on a fan_in-wide matrix
        a.uniform_(-bound, bound, generator=gen)
        inits[name] = LoraInit(a, torch.zeros(d_out, options.lora_rank), lora_scaling(options))
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
    model: nn.Module, batch: Batch, acc: CurvatureAccumulator, options: CurvatureOptions, gen: torch.Generator
) -> tuple[int, int]:
    """Forward once, backward once per label draw; returns (sequences, tokens) that carried labels."""
    device = input_device(model)
    input_ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
    targets = labels[:, 1:]
    valid = targets != -100
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = valid
    acc.new_batch(mask)
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device)).logits[:, :-1]
    log_probs = torch.log_softmax(at_least_float32(logits), -1)
    if options.estimator == "mc":  # the predictive once per batch; the generator lives on the CPU
        probs = log_probs.detach().exp().reshape(-1, log_probs.shape[-1]).cpu()
    for draw in range(options.draws):
        y = _sample_labels(probs, valid, gen) if options.estimator == "mc" else targets
        log_lik = (log_probs.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1) * valid).sum()
        log_lik.backward(retain_graph=draw < options.draws - 1)
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
    bar = progress(mine, desc=f"curvature [{label}]", unit="batch", disable=rank != 0, leave=False)
    start = time.perf_counter()
    for batch in bar:
        sequences, tokens = _backward_batch(model, batch, acc, options, gen)
        counts.sequences += sequences
        counts.tokens += tokens
        counts.batches += 1
        bar.set_postfix(tokens=counts.tokens, tokens_per_s=round(counts.tokens / (time.perf_counter() - start)))
    # Every rank runs as many forwards and backwards: FSDP2 gathers each layer's shards collectively
    # in both. A rank one batch short repeats one with no label, which adds exactly zero.
    for _ in range(-(-len(batches) // world) - len(mine)):
        _backward_batch(model, {**mine[0], "labels": torch.full_like(mine[0]["labels"], -100)}, acc, options, gen)


def _pass(
    model: nn.Module,
    datasets: Mapping[str, Sequence[Batch]],
    modules: Mapping[str, nn.Linear],
    options: ComputeOptions,
    inits: Mapping[str, LoraInit],
    label: str,
) -> tuple[Mapping[str, _Counts], dict[str, Block]]:
    """One pass over every batch with hooks on ``modules`` only; their blocks, finished on the CPU.

    Only these modules' weights require grad, so the backward stops at the lowest of them, and
    each weight's gradient is dropped as soon as it is accumulated (only the hooks' sums count).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for module in modules.values():
        module.weight.requires_grad_(True)  # FSDP2 and accelerate copy the flag to the weight a forward uses
    drops = _GradDrops(modules)
    acc = CurvatureAccumulator(
        dict(modules),
        "diag" if options.diagonal else "kron",
        options.normalization,
        options.kfac_approx,
        batch_gradient=options.estimator == "batch_empirical",
        lora={n: i for n, i in inits.items() if n in modules} if options.diagonal else {},
        sketch_size=options.sketch_size,
        cov_sketch_size=options.cov_sketch_size,
        seed=options.seed,
        dtype=options.compute_dtype,
    )
    acc.attach()
    per_name = {}
    try:
        for name, batches in datasets.items():
            per_name[name] = _Counts()
            _accumulate(model, batches, acc, options, per_name[name], " ".join(filter(None, (name, label))))
    finally:
        acc.detach()
        drops.remove()
    logger.info("%s held %d bytes of sums", label or "the pass", acc.nbytes())
    sums = acc.result()
    counts = all_reduce_sums(sums, per_name)
    total = _Counts(*(sum(getattr(c, f) for c in counts.values()) for f in ("sequences", "tokens", "batches")))
    if total.tokens == 0:
        raise DataError(f"dataset(s) {', '.join(datasets)} hold no labelled tokens")
    on_cpu = {name: module.to("cpu") for name, module in sums.items()}  # frees the device for the next pass
    return counts, make_blocks(on_cpu, total.sequences, total.tokens, options, inits)


class _GradDrops:
    """Drop each target weight's gradient as soon as it is accumulated, whichever tensor held it.

    The hook goes on the weight the module holds during its forward: the parameter itself, or
    FSDP2's unsharded copy (so FSDP2 has no gradient to reduce-scatter). accelerate's offloaded
    weights are a fresh copy in each forward, gone (with their gradient) once the backward ends.
    """

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self._drops: dict[int, tuple[Tensor, RemovableHandle]] = {}  # the tensor is held: ids stay unique
        self._hooks = [module.register_forward_hook(self._seen) for module in modules.values()]

    def _seen(self, module: nn.Module, inputs: object, output: object) -> None:
        weight = module.weight
        if isinstance(weight, Tensor) and weight.requires_grad and not weight.is_meta and id(weight) not in self._drops:
            self._drops[id(weight)] = (weight, weight.register_post_accumulate_grad_hook(_drop_grad))

    def remove(self) -> None:
        for handle in [*self._hooks, *(drop for _, drop in self._drops.values())]:
            handle.remove()
        self._drops.clear()


def _drop_grad(weight: Tensor) -> None:
    weight.grad = None


def compute_artifact(
    model: nn.Module,
    datasets: Mapping[str, Sequence[Batch]],
    targets: Mapping[str, nn.Linear],
    options: ComputeOptions,
    base_model: BaseModelInfo,
    sources: Mapping[str, str] | None = None,
    plan: PassPlan | None = None,
    spill: Path | None = None,
) -> Artifact:
    """Compute a curvature artifact for ``targets`` of a causal LM on named source datasets.

    Args:
        model: A causal LM whose forward takes ``input_ids`` and ``attention_mask`` and returns
            ``.logits``: whole on this process, placed by accelerate (``device_map``, CPU or disk
            offload), or sharded over the ranks with FSDP2 (``fully_shard``; every rank calls this).
        datasets: Dataset name → batches (``input_ids``, ``attention_mask``, ``labels`` with -100
            where no label counts).
        targets: Module name → the ``nn.Linear`` to cover.
        options: What to compute.
        base_model: Identity of the base model (the fingerprint is filled in here).
        sources: Dataset name → where it came from, for the manifest.
        plan: Which modules to hook in which pass over the batches (default: all in one); any
            plan gives the same artifact (:mod:`laplace_hub.producers.plan`).
        spill: A folder where each pass's finished blocks are written (in their stored dtype) as
            the pass ends, so that host memory holds one pass's blocks, not all; the returned
            artifact reads them from there: keep the folder until it is saved.

    Returns:
        An artifact (in memory, or partly in ``spill``); under ``torch.distributed`` every rank
        gets the reduced result.

    """
    options.check()
    if not targets:
        raise LaplaceHubError("no target modules selected", location="targets")
    shapes = {name: linear_shape(module, name) for name, module in targets.items()}  # refuses non-linear ones
    fingerprint = fingerprint_modules(targets)  # first, to fail early; one whole weight at a time, wherever held
    inits = lora_inits(targets, options) if options.parameterization == "lora" else {}
    passes = plan.groups if plan is not None else (tuple(targets),)
    requires = {name: p.requires_grad for name, p in model.named_parameters()}  # by name: engines swap tensors
    model.eval()
    groups = {name: [name] for name in datasets} if options.per_dataset else {None: list(datasets)}
    # modules in the targets' order and tensors written sorted, whatever the plan: the same bytes
    builder = ArtifactBuilder(dtype=options.dtype, packed=options.packed, order=list(shapes), spill=spill)
    infos = []
    try:
        for group, names in groups.items():
            counts: Mapping[str, _Counts] = {}
            for number, modules in enumerate(passes, 1):
                label = f"pass {number}/{len(passes)}" if len(passes) > 1 else ""
                chosen = {name: targets[name] for name in modules}
                counts, found = _pass(model, {n: datasets[n] for n in names}, chosen, options, inits, label)
                for target in (t for t in shapes if t in found):  # q/k/v's shared Σx under the same module's key
                    builder.add(target, shapes[target], found.pop(target), group)
                if spill is not None:
                    builder.spill()
            infos += [
                DatasetInfo(
                    name=n, sequences=c.sequences, tokens=c.tokens, batches=c.batches, source=(sources or {}).get(n)
                )
                for n, c in counts.items()
            ]
    finally:
        for name, flag in requires.items():
            model.get_parameter(name).requires_grad_(flag)
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
        kfac_approx=None if options.diagonal else options.kfac_approx,
        datasets=infos,
        datasets_combined="separate" if options.per_dataset else "summed",
        license=options.license,
    )
