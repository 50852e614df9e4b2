"""Assembling an in-memory :class:`Artifact` from blocks, for producers and tests."""

from __future__ import annotations

import math
import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from torch import Tensor

from laplace_hub.artifact.artifact import Artifact
from laplace_hub.artifact.codec import BlockEncoder
from laplace_hub.artifact.store import tensor_dtype
from laplace_hub.artifact.values import psd_for_storage
from laplace_hub.curvature import Block, pack_symmetric, unpack_symmetric
from laplace_hub.manifest import (
    FORMAT_NAME,
    BlockEntry,
    DType,
    LoraInitRef,
    Manifest,
    ModuleEntry,
    expected_tensors,
    required_version,
)


def software_versions() -> dict[str, str]:
    """Versions of the packages that shape an artifact's numbers, for its provenance record."""
    found = {"python": platform.python_version()}
    for package in ("laplace-hub", "torch", "transformers", "peft", "safetensors", "curvlinops-for-pytorch"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


class ArtifactBuilder:
    """Collects blocks per module, then builds an artifact with a complete manifest.

    Example:
        >>> import torch
        >>> from laplace_hub.curvature import DiagBlock
        >>> builder = ArtifactBuilder(dtype="float32")
        >>> builder.add("layer", (2, 3), DiagBlock(torch.ones(2, 3)))
        >>> art = builder.build(**minimal_fields())
        >>> art.manifest.modules["layer"].shape
        [2, 3]

    """

    def __init__(self, *, dtype: DType = "float32", packed: bool = False) -> None:
        self.dtype = dtype
        self._encoder = BlockEncoder(packed=packed)
        self._entries: dict[str, list[BlockEntry]] = {}
        self._shapes: dict[str, tuple[int, int]] = {}
        self._inits: dict[str, tuple[Tensor, Tensor]] = {}

    def add(self, module: str, shape: tuple[int, int], block: Block, dataset: str | None = None) -> None:
        """Add one module's block (for one dataset, or summed over all with ``dataset=None``)."""
        self._shapes[module] = shape
        self._entries.setdefault(module, []).extend(self._encoder.encode(block, module, dataset))

    def set_lora_init(self, module: str, lora_a: Tensor, lora_b: Tensor) -> None:
        """Record the LoRA init ``(A₀, B₀)`` of a module (lora parameterization)."""
        self._inits[module] = (lora_a, lora_b)

    def build(self, **fields: Any) -> Artifact:
        """The artifact; ``fields`` are the manifest's top-level fields other than modules/files."""
        tensors = {k: t.to(tensor_dtype(self.dtype)) for k, t in self._encoder.tensors.items()}
        modules: dict[str, ModuleEntry] = {}
        init_dtype = tensor_dtype(getattr(fields.get("parameterization"), "init_dtype", "float32"))
        for name, entries in self._entries.items():
            init = None
            if name in self._inits:
                init = LoraInitRef(lora_A=f"{name}.lora_A.init", lora_B=f"{name}.lora_B.init")
                tensors[init.lora_A] = self._inits[name][0].detach().to(init_dtype).contiguous()
                tensors[init.lora_B] = self._inits[name][1].detach().to(init_dtype).contiguous()
            modules[name] = ModuleEntry(shape=list(self._shapes[name]), blocks=entries, lora_init=init)
        manifest = Manifest(
            format=FORMAT_NAME,
            spec_version="1.0",
            dtype=self.dtype,
            modules=modules,
            files={},
            software=fields.pop("software", None) or software_versions(),
            **fields,
        )
        # The lowest version able to hold it, so that older readers read what uses no newer feature.
        manifest = manifest.model_copy(update={"spec_version": required_version(manifest)})
        for key, spec in expected_tensors(manifest).items():
            if spec.role == "factor":
                tensors[key] = storable_factor(self._encoder.tensors[key], self.dtype)
        return Artifact(manifest, tensors.__getitem__)


def storable_factor(tensor: Tensor, dtype: DType) -> Tensor:
    """A factor as stored in ``dtype``, mended where rounding left it a hair indefinite (SPEC.md §8.3)."""
    if tensor.dim() == 2:
        return psd_for_storage(tensor, tensor_dtype(dtype), dtype)
    n = (math.isqrt(8 * tensor.shape[0] + 1) - 1) // 2
    return pack_symmetric(psd_for_storage(unpack_symmetric(tensor, n), tensor_dtype(dtype), dtype))


def minimal_fields(**overrides: Any) -> dict[str, Any]:
    """Manifest fields for a weight-space artifact on one dataset: a starting point for tests and docs."""
    from laplace_hub.manifest import BaseModelInfo, DatasetInfo, Estimator, WeightParameterization

    fields: dict[str, Any] = {
        "base_model": BaseModelInfo(repo_id="example/model"),
        "parameterization": WeightParameterization(kind="weight"),
        "estimator": Estimator(kind="empirical"),
        "loss": "cross_entropy",
        "normalization": "per_sequence",
        "kfac_approx": "expand",
        "datasets": [DatasetInfo(name="source", sequences=8, tokens=128, batches=2)],
        "datasets_combined": "summed",
        "license": "apache-2.0",
    }
    fields.update(overrides)
    return fields
