"""λ sweeps: fine-tune per method, strength and seed; measure learning and forgetting.

Every run is scored on validation and test data, so that :mod:`~laplace_hub.evaluation.choice`
can choose λ on validation means and report test means, as the LaLoRA paper does; and, when the
sweep's data carries them, on the forgetting probes of :mod:`~laplace_hub.evaluation.probes`
(held out from the choice: one set each, reported beside the test means).
"""

from __future__ import annotations

import contextlib
import copy
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from laplace_hub.artifact import Artifact
from laplace_hub.consumers import LaplaceRegularizer, MaskTheTarget, apply_lora_init, regularized_loss
from laplace_hub.data import Batch, make_batches, pydoc_texts
from laplace_hub.errors import DataError, LaplaceHubError
from laplace_hub.evaluation.baselines import MIGU, FlatLoRA, milora_init
from laplace_hub.evaluation.metrics import EXAMPLES, completion_scores, example_batches, source_scores
from laplace_hub.evaluation.probes import PROBE_METRICS, Probes, ProbeSizes, build_probes, probe_scores
from laplace_hub.evaluation.tasks import Example
from laplace_hub.manifest import BaseModelInfo
from laplace_hub.models import select_targets
from laplace_hub.producers import ComputeOptions, compute_artifact
from laplace_hub.progress import progress

# methods that read the weight-space artifact of the structure they are named after
STRUCTURE_METHODS = ("diag", "diag_lowrank", "kron", "kron_eig")
# the paper's LaLoRA forms (DIAG, B-K-FAC, B-TRI-K-FAC): a lora-parameterised artifact of each structure,
# computed at the adapter's own rank, targets and init (one per seed), regularising A − A₀ and B − B₀
PAPER_FORMS = {"lora_diag": "diag", "lora_kron": "kron", "lora_tridiag": "kron_tridiag"}
ALIASES = {"lora_init": "lora_diag"}  # the name before 0.2
METHODS = (
    "lora",
    "l2",
    *STRUCTURE_METHODS,
    "kron_eig_sketch",  # a kron_eig artifact computed in one pass from sketches of the factors
    *PAPER_FORMS,
    "mtt",
    "milora",
    "flat_lora",
    "migu",
)
"""The methods a sweep compares: plain ``lora``, ``l2``, LaLoRA with each weight-space structure,
the paper's three forms on the LoRA weights and the baselines Mask-the-Target, MiLoRA, Flat-LoRA and MIGU."""
# methods whose knob is not a penalty strength sweep their own grid: Flat-LoRA's ρ, MIGU's fraction t
OWN_GRIDS = {
    "lora": (0.0,),
    "milora": (0.0,),
    "mtt": (0.1, 1.0, 10.0),  # a KL weight per token, not a count of source sequences
    "flat_lora": (0.01, 0.05, 0.1),
    "migu": (0.25, 0.5, 0.75),
}
NO_KNOB = ("lora", "milora")
LOOSER_AS_KNOB_GROWS = ("migu",)  # MIGU's t is the fraction of rows that learn: more t, less protection
# which weight-space artifact each method reads
ARTIFACT_FOR = {**{m: m for m in STRUCTURE_METHODS}, "kron_eig_sketch": "kron_eig_sketch"}


def paper_key(method: str, seed: int) -> str:
    """The artifacts mapping's key of a paper form's artifact for one seed (its LoRA init)."""
    return f"{method}@{seed}"


@dataclass(frozen=True)
class SweepConfig:
    """The grid and the fine-tuning recipe shared by every run.

    ``probes`` turns on the forgetting probes (:func:`with_probes`, once per sweep) in the sweep,
    the demo and the continual run; ``probe_sizes`` says how much each reads.
    """

    methods: tuple[str, ...] = METHODS
    strengths: tuple[float, ...] = (10.0, 100.0, 1000.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    targets: str = "q_proj,v_proj"
    lora_rank: int = 8
    steps: int = 40
    batch_size: int = 8
    lr: float = 2e-3
    eig_rank: int = 32
    lowrank_rank: int = 16
    check_fingerprint: bool = True
    probes: bool = True
    probe_sizes: ProbeSizes = field(default_factory=ProbeSizes)
    grids: Mapping[str, tuple[float, ...]] = field(default_factory=lambda: dict(OWN_GRIDS))
    """Methods that sweep their own knob's grid instead of ``strengths`` (a bisection step clears it)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", tuple(dict.fromkeys(ALIASES.get(m, m) for m in self.methods)))

    def check(self) -> None:
        """Refuse unknown methods and empty grids."""
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise LaplaceHubError(f"Invalid method(s) {unknown}. Supported: {METHODS}", location="methods")
        if not self.seeds or (set(self.methods) - {"lora"} and not self.strengths):
            raise LaplaceHubError("a sweep needs at least one seed and, for regularised methods, one strength")


@dataclass(frozen=True)
class SweepData:
    """Target examples and tokenized source batches, each split three ways; the probes, if measured."""

    train: list[Example]
    validation: list[Example]
    test: list[Example]
    source_curvature: list[Batch]
    source_validation: list[Batch]
    source_test: list[Batch]
    probes: Probes | None = None


def with_probes(
    data: SweepData, base: Any, tokenizer: Any, cfg: SweepConfig, curvature_texts: Sequence[str] = ()
) -> SweepData:
    """``data`` with the forgetting probes built from ``base`` (its answers generated once), if ``cfg.probes``.

    ``curvature_texts``: the source documents, which the near and out-of-domain probes avoid.
    """
    if not cfg.probes:
        return data
    return replace(data, probes=build_probes(base, tokenizer, cfg.probe_sizes, exclude=curvature_texts))


def split_source(
    texts: Sequence[str],
    tokenizer: Any,
    *,
    curvature_batches: int,
    eval_batches: int,
    batch_size: int,
    max_length: int,
    seed: int = 0,
) -> tuple[list[Batch], list[Batch], list[Batch]]:
    """Source documents: the first 3/4 for the curvature, the rest halved into validation and test."""
    cut = len(texts) * 3 // 4
    kwargs: dict[str, Any] = dict(max_length=max_length, batch_size=batch_size, seed=seed)
    curvature = make_batches(texts[:cut], tokenizer, num_batches=curvature_batches, **kwargs)
    held_out = make_batches(texts[cut:], tokenizer, num_batches=2 * eval_batches, **kwargs)
    if len(held_out) < 2:
        raise DataError("the held-out quarter of the source data is too small to split into validation and test")
    half = len(held_out) // 2
    return curvature, held_out[:half], held_out[half:]


@dataclass(frozen=True)
class SourceSizes:
    """How much source text the curvature and the forgetting metrics see."""

    curvature_batches: int = 8
    eval_batches: int = 4
    batch_size: int = 4
    max_length: int = 64


def sized_splits(
    texts: Sequence[str], tokenizer: Any, sizes: SourceSizes, seed: int = 0
) -> tuple[list[Batch], list[Batch], list[Batch]]:
    """:func:`split_source` in the sizes of ``sizes``."""
    return split_source(
        texts,
        tokenizer,
        curvature_batches=sizes.curvature_batches,
        eval_batches=sizes.eval_batches,
        batch_size=sizes.batch_size,
        max_length=sizes.max_length,
        seed=seed,
    )


def pydoc_splits(tokenizer: Any, sizes: SourceSizes, seed: int = 0) -> tuple[list[Batch], list[Batch], list[Batch]]:
    """:func:`sized_splits` of the stdlib's Python reference text (no download)."""
    return sized_splits(pydoc_texts(), tokenizer, sizes, seed)


def curvature_artifacts(model: Any, data: SweepData, cfg: SweepConfig) -> dict[str, Artifact]:
    """The artifacts the methods need, computed on the curvature split.

    Each weight-space one once, each paper form's once per seed (at that seed's LoRA init, keyed
    by :func:`paper_key`).
    """
    options = {
        "diag": ComputeOptions(structure="diag"),
        "diag_lowrank": ComputeOptions(structure="diag_lowrank", lowrank_rank=cfg.lowrank_rank),
        "kron": ComputeOptions(structure="kron"),
        "kron_eig": ComputeOptions(structure="kron", eig_rank=cfg.eig_rank),
        "kron_eig_sketch": ComputeOptions(structure="kron", eig_rank=cfg.eig_rank, eig_sketch=True),
    }
    needed = {ARTIFACT_FOR[m]: options[ARTIFACT_FOR[m]] for m in cfg.methods if m in ARTIFACT_FOR}
    for method in (m for m in cfg.methods if m in PAPER_FORMS):
        for seed in cfg.seeds:
            needed[paper_key(method, seed)] = ComputeOptions(
                structure=PAPER_FORMS[method],  # type: ignore[arg-type]
                parameterization="lora",
                lora_rank=cfg.lora_rank,
                lora_alpha=2 * cfg.lora_rank,  # as finetune's LoraConfig
                seed=seed,
            )
    targets = select_targets(model, cfg.targets)
    info = BaseModelInfo(repo_id=getattr(model.config, "name_or_path", "") or "model")
    return {
        name: compute_artifact(model, {"source": data.source_curvature}, targets, needed[name], info)
        for name in sorted(needed)
    }


def regularizer_for(
    method: str, strength: float, model: Any, artifacts: Mapping[str, Artifact], cfg: SweepConfig, seed: int
) -> LaplaceRegularizer | None:
    """The method's penalty on a fresh PEFT ``model`` (a paper form first sets the adapter to its artifact's init)."""
    if method == "l2":
        return LaplaceRegularizer.identity(model, strength=strength)
    if method in PAPER_FORMS:
        artifact = artifacts[paper_key(method, seed)]
        apply_lora_init(model, artifact)
        return LaplaceRegularizer.from_artifact(
            artifact, model, strength=strength, mode="lora_init", check_fingerprint=cfg.check_fingerprint
        )
    if method not in ARTIFACT_FOR:
        return None
    return LaplaceRegularizer.from_artifact(
        artifacts[ARTIFACT_FOR[method]], model, strength=strength, check_fingerprint=cfg.check_fingerprint
    )


def finetune(
    base: Any,
    tokenizer: Any,
    train: Sequence[Example],
    method: str,
    strength: float,
    artifacts: Mapping[str, Artifact],
    cfg: SweepConfig,
    seed: int,
) -> tuple[Any, float]:
    """LoRA fine-tuning of a copy of ``base`` with one method's penalty; returns (model, seconds)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    modules = cfg.targets if cfg.targets == "all-linear" else cfg.targets.split(",")  # PEFT's shorthand is a string
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, target_modules=modules, lora_dropout=0.0)
    model = get_peft_model(copy.deepcopy(base), config)
    if method == "milora":
        milora_init(model)
    reg = regularizer_for(method, strength, model, artifacts, cfg, seed)
    mask_the_target = MaskTheTarget(model, strength) if method == "mtt" else None
    flat = FlatLoRA(model, strength, seed) if method == "flat_lora" else None
    migu = MIGU(model, strength) if method == "migu" else None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    rng = random.Random(seed)
    start = time.perf_counter()
    model.train()
    for _ in range(cfg.steps):
        (batch,) = example_batches(rng.sample(list(train), cfg.batch_size), tokenizer, cfg.batch_size)
        optimizer.zero_grad()
        with flat.perturbed() if flat is not None else contextlib.nullcontext():
            output = model(**batch)
            loss = regularized_loss(output.loss, reg)
            if mask_the_target is not None:
                loss = loss + mask_the_target(batch, output.logits)
            loss.backward()
        if migu is not None:
            migu.mask_gradients()
        optimizer.step()
    model.eval()
    return model, time.perf_counter() - start


def evaluate(model: Any, tokenizer: Any, data: SweepData) -> dict[str, Any]:
    """Validation and test metrics of one model, then the probes' (when ``data`` has them).

    Test metrics and probes also come per example (``<metric>_examples``, :class:`Scores`), for
    the confidence intervals of :mod:`~laplace_hub.evaluation.stats`.
    """
    out: dict[str, Any] = {}
    for split, examples, source in (
        ("val", data.validation, data.source_validation),
        ("test", data.test, data.source_test),
    ):
        scores = {"target_em": completion_scores(model, example_batches(examples, tokenizer))}
        scores.update(source_scores(model, source))
        for key, value in scores.items():
            out[f"{split}_{key}"] = value.mean
            if split == "test":
                out[f"{split}_{key}{EXAMPLES}"] = value
    if data.probes is not None:
        for key, value in probe_scores(model, data.probes).items():
            out[key], out[f"{key}{EXAMPLES}"] = value.mean, value
    return out


def planned_runs(cfg: SweepConfig) -> list[tuple[str, float, int]]:
    """Every (method, strength, seed) of the grid; methods with their own knob use their own grid."""
    return [(m, s, seed) for m in cfg.methods for s in cfg.grids.get(m, cfg.strengths) for seed in cfg.seeds]


def plan_line(cfg: SweepConfig, done: Sequence[Mapping[str, Any]] = ()) -> str | None:
    """What a sweep of more than a few runs says before the first: how many fine-tunings it means."""
    runs = len(pending_runs(cfg, done))
    if runs <= 6:
        return None
    return (
        f"sweep: {runs} fine-tuning runs of {cfg.steps} steps to do ({len(cfg.methods)} methods × strengths × "
        f"{len(cfg.seeds)} seeds); the progress bar shows the time left after the first. "
        "Narrow it with --methods, --strengths and --seeds."
    )


def pending_runs(cfg: SweepConfig, done: Sequence[Mapping[str, Any]]) -> list[tuple[str, float, int]]:
    """The planned runs that ``done`` (rows of an earlier, interrupted or narrower sweep) lacks."""
    have = {(r["method"], float(r["strength"]), r["seed"]) for r in done}
    return [run for run in planned_runs(cfg) if run not in have]


def run_sweep(
    base: Any,
    tokenizer: Any,
    data: SweepData,
    cfg: SweepConfig,
    artifacts: Mapping[str, Artifact],
    done: Sequence[Mapping[str, Any]] = (),
    save: Callable[[list[dict[str, Any]]], object] | None = None,
) -> list[dict[str, Any]]:
    """One row per run (plus the base model's row, method ``base``), ``done`` rows kept as they are.

    ``save`` gets all rows after every run, so that an interrupted sweep resumes where it stopped.
    """
    cfg.check()
    rows = [dict(r) for r in done]
    base_row = next((r for r in rows if r["method"] == "base"), None)
    if base_row is None:
        rows.insert(
            0, {"method": "base", "strength": 0.0, "seed": None, "seconds": 0.0, **evaluate(base, tokenizer, data)}
        )
    elif data.probes is not None and any(base_row.get(m) is None for m in PROBE_METRICS):
        for key, value in probe_scores(base, data.probes).items():  # rows of a sweep run without the probes
            base_row[key], base_row[f"{key}{EXAMPLES}"] = value.mean, value
    for method, strength, seed in progress(pending_runs(cfg, done), desc="sweep", unit="run"):
        model, seconds = finetune(base, tokenizer, data.train, method, strength, artifacts, cfg, seed)
        rows.append(
            {
                "method": method,
                "strength": strength,
                "seed": seed,
                "seconds": round(seconds, 2),
                **evaluate(model, tokenizer, data),
            }
        )
        if save is not None:
            save(rows)
    return rows
