"""Assembling an in-memory :class:`Artifact` from blocks, for producers and tests."""

from __future__ import annotations

import math
import platform
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from laplace_hub.artifact.artifact import Artifact
from laplace_hub.artifact.codec import BlockEncoder
from laplace_hub.artifact.store import distinct, tensor_dtype
from laplace_hub.artifact.values import psd_for_storage
from laplace_hub.curvature import Block, pack_symmetric, unpack_symmetric
from laplace_hub.manifest import (
    FORMAT_NAME,
    BlockEntry,
    DType,
    LoraInitRef,
    Manifest,
    ModuleEntry,
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

    With a ``spill`` folder, :meth:`spill` moves the tensors added so far there, in their stored
    form, and frees them: a producer that computes its modules in passes holds one pass's finished
    blocks at a time, and the artifact it builds reads the rest from those files (keep the folder
    until the artifact is saved). The bytes written do not depend on when tensors were spilled.

    Example:
        >>> import torch
        >>> from laplace_hub.curvature import DiagBlock
        >>> builder = ArtifactBuilder(dtype="float32")
        >>> builder.add("layer", (2, 3), DiagBlock(torch.ones(2, 3)))
        >>> art = builder.build(**minimal_fields())
        >>> art.manifest.modules["layer"].shape
        [2, 3]

    """

    def __init__(
        self, *, dtype: DType = "float32", packed: bool = False, order: Sequence[str] = (), spill: Path | None = None
    ) -> None:
        self.dtype = dtype
        self._encoder = BlockEncoder(packed=packed)
        self._entries: dict[str, list[BlockEntry]] = {name: [] for name in order}  # the manifest's module order
        self._shapes: dict[str, tuple[int, int]] = {}
        self._inits: dict[str, tuple[Tensor, Tensor]] = {}
        self._spill = spill
        self._spilled: dict[str, Path] = {}

    def add(self, module: str, shape: tuple[int, int], block: Block, dataset: str | None = None) -> None:
        """Add one module's block (for one dataset, or summed over all with ``dataset=None``)."""
        self._shapes[module] = shape
        self._entries.setdefault(module, []).extend(self._encoder.encode(block, module, dataset))

    def set_lora_init(self, module: str, lora_a: Tensor, lora_b: Tensor) -> None:
        """Record the LoRA init ``(A₀, B₀)`` of a module (lora parameterization)."""
        self._inits[module] = (lora_a, lora_b)

    def spill(self) -> None:
        """Write the tensors added since the last spill to a file in the spill folder, and let them go."""
        if self._spill is None:
            raise ValueError("this builder has no spill folder")
        stored = self._stored(self._encoder.release())
        if stored:
            path = self._spill / f"part-{len(set(self._spilled.values())):05d}.safetensors"
            save_file(distinct(stored), path)
            self._spilled.update(dict.fromkeys(stored, path))

    def _stored(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Tensors in the stored dtype; dense factors mended where rounding left them a hair indefinite."""
        factors = self._encoder.factor_keys
        return {
            k: storable_factor(t, self.dtype) if k in factors else t.to(tensor_dtype(self.dtype))
            for k, t in tensors.items()
        }

    def build(self, **fields: Any) -> Artifact:
        """The artifact; ``fields`` are the manifest's top-level fields other than modules/files."""
        tensors = self._stored(self._encoder.tensors)
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
        spilled = self._spilled

        def tensor(key: str) -> Tensor:
            if key in spilled:
                with safe_open(str(spilled[key]), framework="pt") as f:
                    return f.get_tensor(key)
            return tensors[key]

        return Artifact(manifest, tensor)


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
