"""Continual posteriors: fold a new task's curvature into the prior, never recomputing old curvature.

Laplace filtering over tasks: after fine-tuning on task ``t``, the curvature ``P_new`` computed at
the fine-tuned weights joins the prior, whose precision first decays by ``γ ∈ (0, 1]``:
``P = γ·P_prior + P_new``, with the mean at the new weights (the new artifact's ``base_model``).
A sum of Kronecker blocks has no Kronecker form, so the merge is exact instead of approximate:
every computed artifact keeps its blocks under datasets of its own, ``γ`` goes into their dataset
weights (which readers already apply, SPEC.md §5), and ``lineage`` records which artifact, at
which weights, on which data, each part came from.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from torch import Tensor

from laplace_hub.artifact.artifact import Artifact
from laplace_hub.artifact.builder import software_versions
from laplace_hub.artifact.store import tensor_dtype
from laplace_hub.artifact.structures import codec_for
from laplace_hub.artifact.values import decoded_factor
from laplace_hub.errors import ArtifactError
from laplace_hub.manifest import (
    FORMAT_NAME,
    INTRODUCED_IN,
    MANIFEST_NAME,
    MAX_DATASET_NAME_LENGTH,
    MAX_KEY_LENGTH,
    MIN_DATASET_WEIGHT,
    BlockEntry,
    DatasetInfo,
    DType,
    LineageEntry,
    LoraParameterization,
    Manifest,
    ModuleEntry,
    expected_tensors,
    first_problem,
    manifest_json,
    required_version,
    unknown_fields,
)


@dataclass(frozen=True)
class _Part:
    """One computed artifact inside a (possibly already merged) artifact."""

    artifact: Artifact
    lineage: LineageEntry
    block_datasets: tuple[str | None, ...]  # the blocks' ``dataset`` fields (None when summed)
    infos: tuple[DatasetInfo, ...]  # one per entry of block_datasets


def manifest_sha256(artifact: Artifact) -> str:
    """sha256 of the artifact's ``laplace.json`` (of its canonical form when not on disk)."""
    if artifact.path is not None and (artifact.path / MANIFEST_NAME).is_file():
        return hashlib.sha256((artifact.path / MANIFEST_NAME).read_bytes()).hexdigest()
    text = json.dumps(manifest_json(artifact.manifest), indent=2) + "\n"
    return hashlib.sha256(text.encode()).hexdigest()


def _parts(artifact: Artifact, source: str | None) -> Iterator[_Part]:
    m = artifact.manifest
    by_name = {d.name: d for d in m.datasets}
    if m.lineage is not None:
        for entry in m.lineage:
            yield _Part(artifact, entry, tuple(entry.datasets), tuple(by_name[n] for n in entry.datasets))
        return
    if m.datasets_combined == "separate":
        names: tuple[str | None, ...] = tuple(by_name)
        infos = tuple(m.datasets)
    else:  # summed: the blocks hold all datasets pooled, so they become one dataset here
        names, infos = (None,), (_pooled(m.datasets),)
    entry = LineageEntry(
        base_model=m.base_model,
        datasets=[d.name for d in infos],
        decay=1.0,
        manifest_sha256=manifest_sha256(artifact),
        source=source,
    )
    yield _Part(artifact, entry, names, infos)


def _pooled(datasets: list[DatasetInfo]) -> DatasetInfo:
    if len(datasets) == 1:
        return datasets[0]
    return DatasetInfo(
        name="pooled",
        sequences=sum(d.sequences for d in datasets),
        tokens=sum(d.tokens for d in datasets),
        batches=sum(d.batches for d in datasets),
        description="pooled: " + ", ".join(d.name for d in datasets),
    )


def _rekey(entry: BlockEntry, dataset: str, rename: _Renames, prefix: str, merged: bool) -> BlockEntry:
    """The entry under ``dataset`` with every tensor key prefixed (and recorded in ``rename``).

    Keys of an already merged artifact lose their old ``<index>/`` prefix, so they do not grow.
    """
    key_fields = codec_for(entry).key_fields

    def walk(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        out = {}
        for name, value in node.items():
            if name in key_fields and isinstance(value, str):
                value = rename.new.get(value) or rename.add(value, prefix, merged)
            out[name] = walk(value)
        return out

    data = walk(entry.model_dump(mode="json"))
    data["dataset"] = dataset
    return type(entry).model_validate(data)


@dataclass
class _Renames:
    """Old key → new key within one part, with the new keys taken so far."""

    new: dict[str, str] = field(default_factory=dict)
    taken: set[str] = field(default_factory=set)

    def add(self, old: str, prefix: str, merged: bool) -> str:
        """A key for ``old`` under ``prefix`` that no other key of the part has taken.

        Dropping an old ``<index>/`` prefix can make two keys one (``0/x`` and ``1/x``): then the
        second keeps its full old name.
        """
        candidates = [re.sub(r"^[0-9]+/", "", old)] if merged else []
        candidates += [old, *(f"{old}.{n}" for n in range(2, len(self.taken) + 3))]
        key = next(k for k in (_fit(prefix + c) for c in candidates) if k not in self.taken)
        self.new[old] = key
        self.taken.add(key)
        return key


def _fit(key: str) -> str:
    """A tensor key within the spec's 512 characters: a long one keeps its head and a digest of the rest."""
    if len(key) <= MAX_KEY_LENGTH:
        return key
    return f"{key[: MAX_KEY_LENGTH - 17]}.{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _unique(name: str, taken: set[str]) -> str:
    """``name``, or ``name-2``, ``name-3`` … shortened to stay within the spec's 64 characters."""
    candidate, n = name, 2
    while candidate in taken:
        suffix = f"-{n}"
        candidate, n = name[: MAX_DATASET_NAME_LENGTH - len(suffix)] + suffix, n + 1
    taken.add(candidate)
    return candidate


def _check_compatible(prior: Manifest, new: Manifest) -> None:
    for which, m in (("prior", prior), ("new", new)):
        extra = list(unknown_fields(m))
        if extra:
            raise ArtifactError(
                f"the {which} artifact has fields this reader does not know ({', '.join(extra[:3])}); "
                "a merge would drop them: upgrade laplace-hub",
                location=extra[0],
            )
        if isinstance(m.parameterization, LoraParameterization):
            raise ArtifactError(
                f"the {which} artifact is lora-parameterised; only weight-space curvature merges across tasks",
                location="parameterization",
            )
    if set(prior.modules) != set(new.modules):
        odd = sorted(set(prior.modules) ^ set(new.modules))
        raise ArtifactError(f"the artifacts cover different modules, e.g. {odd[:2]}", location="modules")
    for name, module in new.modules.items():
        if module.shape != prior.modules[name].shape:
            raise ArtifactError(
                f"shape {module.shape} differs from the prior's {prior.modules[name].shape}", location=name
            )
    for attribute in ("loss", "normalization"):
        if getattr(prior, attribute) != getattr(new, attribute):
            raise ArtifactError(
                f"{attribute} differs ({getattr(prior, attribute)} vs {getattr(new, attribute)}): "
                "the precisions do not add",
                location=attribute,
            )
    if prior.estimator.kind != new.estimator.kind:
        raise ArtifactError(
            f"estimators differ ({prior.estimator.kind} vs {new.estimator.kind}); compute both the same way",
            location="estimator",
        )
    if None not in (prior.kfac_approx, new.kfac_approx) and prior.kfac_approx != new.kfac_approx:
        raise ArtifactError(f"kfac_approx differs ({prior.kfac_approx} vs {new.kfac_approx})", location="kfac_approx")


def _wider(a: DType, b: DType) -> DType:
    """The stored dtype that loses nothing of either (two different half types meet in float32)."""
    if a == b:
        return a
    return "float64" if "float64" in (a, b) else "float32"


def _same_source(a: Manifest, b: Manifest) -> bool:
    """Computed at the same weights from the same datasets: one curvature, not two tasks'."""
    return a.base_model.fingerprint is not None and a.base_model == b.base_model and _counts(a) == _counts(b)


def _counts(m: Manifest) -> list[tuple[int, int, int]]:
    return [(d.sequences, d.tokens, d.batches) for d in m.datasets]


def merge(
    prior: Artifact, new: Artifact, *, decay: float = 1.0, sources: tuple[str | None, str | None] = (None, None)
) -> Artifact:
    """The posterior ``decay · P_prior + P_new`` with its mean at ``new``'s base model.

    Args:
        prior: The prior artifact (itself computed, or already merged).
        new: Curvature computed at the fine-tuned weights on the last task's data.
        decay: ``γ ∈ (0, 1]``; older tasks fade geometrically (``1`` forgets nothing).
        sources: Where ``prior`` and ``new`` were read from, for the lineage.

    Raises:
        ArtifactError: the two cannot be added (parameterisation, modules, shapes, scale).

    """
    if not 0 < decay <= 1:
        raise ArtifactError(f"decay must lie in (0, 1], got {decay}", location="decay")
    _check_compatible(prior.manifest, new.manifest)
    if _same_source(prior.manifest, new.manifest):
        warnings.warn(
            "both artifacts hold curvature of the same base weights and the same data (an artifact and "
            "its compressed copy?): the merged posterior counts that curvature twice",
            stacklevel=2,
        )
    dtype = _wider(prior.manifest.dtype, new.manifest.dtype)
    blocks: dict[str, list[BlockEntry]] = {name: [] for name in new.manifest.modules}
    tensors: dict[str, Tensor] = {}
    datasets: list[DatasetInfo] = []
    lineage: list[LineageEntry] = []
    taken: set[str] = set()
    parts = [(p, decay) for p in _parts(prior, sources[0])] + [(p, 1.0) for p in _parts(new, sources[1])]
    for index, (part, scale) in enumerate(parts):
        names = {old: _unique(info.name, taken) for old, info in zip(part.block_datasets, part.infos, strict=True)}
        rename = _Renames()
        merged = part.artifact.manifest.lineage is not None
        for module, entry in part.artifact.manifest.modules.items():
            for block in entry.blocks:
                if block.dataset in names:
                    blocks[module].append(_rekey(block, names[block.dataset], rename, f"{index}/", merged))
        roles = {k: spec.role for k, spec in expected_tensors(part.artifact.manifest).items()}
        for old, key in rename.new.items():
            stored = part.artifact.tensor(old)
            if roles[old] == "factor" and part.artifact.manifest.dtype != dtype:
                stored = decoded_factor(stored)
            tensors[key] = stored.to(tensor_dtype(dtype))
        for dataset, info in zip(part.block_datasets, part.infos, strict=True):
            weight = info.weight * scale
            if 0 < weight < MIN_DATASET_WEIGHT:
                raise ArtifactError(
                    f"dataset {info.name!r} would weigh {weight:.3g} after this decay, below the spec's 2^-16: "
                    "its curvature no longer matters; merge from a later prior instead",
                    location="decay",
                )
            datasets.append(info.model_copy(update={"name": names[dataset], "weight": weight}))
        lineage.append(
            part.lineage.model_copy(update={"datasets": list(names.values()), "decay": part.lineage.decay * scale})
        )
    m = new.manifest
    try:
        manifest = Manifest(
            format=FORMAT_NAME,
            spec_version=INTRODUCED_IN["field lineage"],
            base_model=m.base_model,
            parameterization=m.parameterization,
            estimator=m.estimator,
            loss=m.loss,
            normalization=m.normalization,
            kfac_approx=m.kfac_approx or prior.manifest.kfac_approx,
            datasets=datasets,
            datasets_combined="separate",
            dtype=dtype,
            modules={name: ModuleEntry(shape=m.modules[name].shape, blocks=b) for name, b in blocks.items()},
            files={},
            software=software_versions(),
            license=m.license if m.license == prior.manifest.license else None,
            lineage=lineage,
        )
    except ValidationError as e:  # e.g. more than 256 datasets after many merges
        where, message = first_problem(e)
        raise ArtifactError(f"the merged manifest would break the spec: {message}", location=where) from e
    manifest = manifest.model_copy(update={"spec_version": required_version(manifest)})
    return Artifact(manifest, tensors.__getitem__)
