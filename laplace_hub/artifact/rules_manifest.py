"""Rules of the manifest alone: parsing, version, and the cross-field rules the models cannot express."""

from __future__ import annotations

from collections import Counter
from typing import Any

from pydantic import ValidationError

from laplace_hub.artifact.findings import Sink
from laplace_hub.artifact.structures import REGISTRY, codec_for
from laplace_hub.errors import LaplaceHubError
from laplace_hub.fingerprint import root_digest
from laplace_hub.manifest import (
    INTRODUCED_IN,
    MIN_DATASET_WEIGHT,
    SPEC_VERSION,
    FactorRef,
    Fingerprint,
    LoraParameterization,
    Manifest,
    ModuleEntry,
    check_version,
    features,
    parse_version,
    unknown_fields,
)

MAX_FACTOR_SIDE = 32768
"""The largest dense factor a validator factorises (Cholesky ≈ 1.2·10¹³ flops): Llama-3-70B's widest is 28672."""
_PAIRS = " or ".join(name for name, codec in REGISTRY.items() if codec.pair)  # structures of a whole LoRA pair


def parse_into(report: Sink, raw: Any) -> Manifest | None:
    """Parse ``raw`` as a manifest, recording every problem; ``None`` when it cannot be used."""
    if not isinstance(raw, dict):
        report.add("manifest.json_invalid", "laplace.json", "the manifest must be a JSON object")
        return None
    try:
        found = check_version(raw)
    except LaplaceHubError as e:
        report.error(e, "laplace.json")
        return None
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as e:
        for error in e.errors():
            where = ".".join(str(part) for part in error["loc"]) or "laplace.json"
            report.add("manifest.schema", where, error["msg"])
        return None
    newer = found > parse_version(SPEC_VERSION)
    for path in unknown_fields(manifest):
        if newer:
            report.add("manifest.unknown_field", path, f"not in spec {SPEC_VERSION}; kept", "warning")
        else:
            report.add("manifest.unknown_field", path, f"not a field of spec {manifest.spec_version}; remove it")
    return manifest


def check_semantics(report: Sink, manifest: Manifest) -> None:
    """Cross-field rules of SPEC.md §4–§6 and §10."""
    _check_features(report, manifest)
    _check_estimator(report, manifest)
    _check_datasets(report, manifest)
    _check_lineage(report, manifest)
    _check_fingerprints(report, manifest)
    for name, module in manifest.modules.items():
        _check_module(report, manifest, name, module)


def _check_features(report: Sink, m: Manifest) -> None:
    for feature in sorted(features(m)):
        if parse_version(m.spec_version) < parse_version(INTRODUCED_IN[feature]):
            report.add(
                "manifest.newer_feature",
                "spec_version",
                f"{feature} needs spec_version ≥ {INTRODUCED_IN[feature]}, the manifest says {m.spec_version}",
            )


def _check_fingerprints(report: Sink, m: Manifest) -> None:
    """A v2 fingerprint lists one digest per module (the top level's: exactly the manifest's) under its root."""
    located: list[tuple[str, Fingerprint | None, set[str]]]
    located = [("base_model.fingerprint", m.base_model.fingerprint, set(m.modules))]
    located += [  # every merged part covers the manifest's modules (SPEC.md §11)
        (f"lineage.{i}.base_model.fingerprint", p.base_model.fingerprint, set(m.modules))
        for i, p in enumerate(m.lineage or [])
    ]
    for where, fingerprint, names in located:
        if fingerprint is None:
            continue
        if (fingerprint.algorithm == "sha256-f32-v2") != (fingerprint.modules is not None):
            report.add("manifest.fingerprint", where, "sha256-f32-v2, and only it, lists the modules' digests")
        elif fingerprint.modules is not None:
            if set(fingerprint.modules) != names:
                odd = sorted(set(fingerprint.modules) ^ names)[:3]
                report.add("manifest.fingerprint", where, f"its modules must be the manifest's; differs at {odd}")
            elif root_digest(fingerprint.modules) != fingerprint.value:
                report.add("manifest.fingerprint", where, "value is not the digest of its modules' digests (§7)")


def _check_lineage(report: Sink, m: Manifest) -> None:
    if m.lineage is None:
        return
    if m.datasets_combined != "separate":
        report.add("manifest.lineage", "datasets_combined", "a merged posterior keeps each task's datasets separate")
    if isinstance(m.parameterization, LoraParameterization):
        report.add("manifest.lineage", "parameterization", "only weight-space curvature merges across tasks")
    named = Counter(name for entry in m.lineage for name in entry.datasets)
    datasets = {d.name for d in m.datasets}
    for name in sorted(datasets - set(named)):
        report.add("manifest.lineage", "lineage", f"dataset {name!r} comes from no lineage entry")
    for name in sorted(set(named) - datasets):
        report.add("manifest.lineage", "lineage", f"lineage names dataset {name!r}, which is not in datasets")
    for name, count in named.items():
        if count > 1:
            report.add("manifest.lineage", "lineage", f"dataset {name!r} is named by {count} lineage entries")


def _check_estimator(report: Sink, m: Manifest) -> None:
    est = m.estimator
    if (est.kind == "mc") != (est.mc_samples is not None):
        report.add("manifest.estimator", "estimator.mc_samples", "mc_samples is required for mc and only for mc")
    kron = any(codec_for(b).kronecker for module in m.modules.values() for b in module.blocks)
    if kron and m.kfac_approx is None:
        report.add("manifest.kfac_approx", "kfac_approx", "Kronecker blocks need kfac_approx (expand or reduce)")
    if m.kfac_approx == "reduce" and m.normalization == "per_token":
        report.add("manifest.kfac_approx", "kfac_approx", "reduce aggregates over a sequence; per_token needs expand")


def _check_datasets(report: Sink, m: Manifest) -> None:
    for name, count in Counter(d.name for d in m.datasets).items():
        if count > 1:
            report.add("manifest.datasets", "datasets", f"dataset name {name!r} appears {count} times")
    for i, d in enumerate(m.datasets):
        where = f"datasets.{i}"
        if d.tokens < d.sequences:
            report.add("counts.inconsistent", where, f"{d.tokens} tokens < {d.sequences} sequences")
        if d.batches > d.sequences:
            report.add("counts.inconsistent", where, f"{d.batches} batches > {d.sequences} sequences")
    for i, d in enumerate(m.datasets):
        if 0 < d.weight < MIN_DATASET_WEIGHT:
            report.add("manifest.datasets", f"datasets.{i}.weight", f"{d.weight:.3g} is below 2^-16 (use 0 to drop it)")
    if m.datasets_combined == "summed" and any(d.weight != 1.0 for d in m.datasets):
        report.add("manifest.datasets", "datasets", "summed datasets have weight 1: weights apply to separate datasets")


def widest_side(m: Manifest, module: ModuleEntry) -> int:
    """The widest dense factor a module's blocks can hold: d_out, d_in or (LoRA) the rank."""
    return max(*module.shape, m.parameterization.rank if isinstance(m.parameterization, LoraParameterization) else 0)


def too_wide(m: Manifest) -> bool:
    """Whether a module has a dense factor beyond the side a validator factorises (SPEC.md §8.1)."""
    return any(
        widest_side(m, module) > MAX_FACTOR_SIDE and any(_has_dense_factor(b) for b in module.blocks)
        for module in m.modules.values()
    )


def _has_dense_factor(block: Any) -> bool:
    return any(isinstance(ref, FactorRef) for _, ref in block)


def _check_module(report: Sink, m: Manifest, name: str, module: ModuleEntry) -> None:
    where = f"modules.{name}"
    lora = isinstance(m.parameterization, LoraParameterization)
    names = {d.name for d in m.datasets}
    covered: dict[str | None, set[str]] = {}
    widest = widest_side(m, module)
    for i, block in enumerate(module.blocks):
        at = f"{where}.blocks.{i}"
        if m.datasets_combined == "summed" and block.dataset is not None:
            report.add("manifest.datasets", at, "datasets are summed, so blocks must not name one")
        if m.datasets_combined == "separate" and block.dataset not in names:
            report.add("manifest.datasets", at, f"dataset {block.dataset!r} is not one of {sorted(names)}")
        if (block.param == "weight") == lora:
            report.add(
                "manifest.param", at, f"param {block.param!r} does not fit parameterization {m.parameterization.kind!r}"
            )
        if codec_for(block).pair != (block.param == "lora_AB"):
            report.add("manifest.param", at, f"{_PAIRS} covers param lora_AB, and only it does")
        if _has_dense_factor(block) and widest > MAX_FACTOR_SIDE:
            report.add(
                "manifest.factor_side",
                at,
                f"a dense factor of side {widest} (at most {MAX_FACTOR_SIDE}: checking it would cost a "
                "validator ~10¹³ flops or more); store it as kron_eig",
            )
        params = covered.setdefault(block.dataset, set())
        if block.param in params:
            report.add("manifest.param", at, f"param {block.param!r} is covered twice for this dataset")
        params.add(block.param)
    wanted = {"weight"} if not lora else None
    for dataset, params in covered.items():
        ok = params == wanted if wanted else params in ({"lora_A", "lora_B"}, {"lora_AB"})
        if not ok:
            report.add(
                "manifest.param",
                where,
                f"dataset {dataset or 'all'} covers {sorted(params)}; "
                f"expected {sorted(wanted) if wanted else 'lora_A+lora_B or lora_AB'}",
            )
    if m.datasets_combined == "separate" and set(covered) != names:
        report.add("manifest.datasets", where, f"covers datasets {sorted(map(str, covered))}, expected {sorted(names)}")
    if lora and module.lora_init is None:
        report.add("lora.init_missing", where, "lora parameterization needs lora_init tensors for every module")
    if not lora and module.lora_init is not None:
        report.add("manifest.param", where, "lora_init is only allowed with the lora parameterization")
