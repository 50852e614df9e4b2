"""An artifact in memory or on disk: manifest plus lazily loaded tensors, turned into blocks."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from laplace_hub.artifact.codec import as_dtype
from laplace_hub.artifact.files import DEFAULT_MAX_BYTES
from laplace_hub.artifact.findings import FirstError, Sink
from laplace_hub.artifact.reader import DiskTensors, read
from laplace_hub.artifact.staging import replace_folder, staging_folder
from laplace_hub.artifact.store import DEFAULT_MAX_SHARD_BYTES, tensor_dtype, write_artifact
from laplace_hub.artifact.structures import Context, codec_for
from laplace_hub.curvature import Block, LoraPairBlock, WeightBlock
from laplace_hub.errors import ArtifactError, StructureError
from laplace_hub.manifest import Manifest, ModuleEntry, expected_tensors


class HubLayer(Protocol):
    """What the hub layer provides to :class:`Artifact`'s hub conveniences (it registers itself)."""

    def pull(self, repo_id: str, **kwargs: Any) -> Artifact: ...

    def push(self, folder: Path, repo_id: str, **kwargs: Any) -> Any: ...


_HUB_LAYER: list[HubLayer] = []


def connect_hub_layer(layer: HubLayer) -> None:
    """Called by :mod:`laplace_hub.hub` on import, so that this layer never imports the one above it."""
    _HUB_LAYER[:] = [layer]


def _hub_layer() -> HubLayer:
    if not _HUB_LAYER:  # importing any laplace_hub module imports the package, which imports the hub layer
        raise ArtifactError("the hub layer is not loaded; import laplace_hub.hub")
    return _HUB_LAYER[0]


class Artifact:
    """A curvature artifact: its :class:`Manifest` and a way to get its tensors.

    Open one from a folder with :meth:`open`, build one with :class:`ArtifactBuilder`, then ask
    for a module's :meth:`block`.

    Example:
        >>> art = Artifact.open("spec/conformance/1.0/valid/weight-kron")
        >>> art.manifest.parameterization.kind
        'weight'
        >>> block = art.block(next(iter(art.manifest.modules)))
        >>> type(block).__name__
        'KronBlock'

    """

    def __init__(
        self, manifest: Manifest, tensors: Callable[[str], Tensor], path: Path | None = None, sink: Sink | None = None
    ) -> None:
        self.manifest = manifest
        self._tensors = tensors
        self.path = path
        self._sink = sink  # where read-time rules report; None for artifacts built in memory
        self.origin: Any = None  # set by a pull: repo, resolved commit sha, subfolder

    @classmethod
    def from_pretrained(cls, repo_id: str, **kwargs: Any) -> Artifact:
        """Pull an artifact from a hub (``laplace_hub.hub.pull``; same keyword arguments)."""
        return _hub_layer().pull(repo_id, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Publish this artifact (saved on disk) as one commit (``laplace_hub.hub.push``)."""
        if self.path is None:
            raise ArtifactError("save the artifact to a folder before pushing it")
        return _hub_layer().push(self.path, repo_id, **kwargs)

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        verify_checksums: bool = False,
        check_values: bool = False,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> Artifact:
        """Open an artifact folder lazily: only the manifest, index and headers are read now.

        Every rule of the spec that can be checked without the tensors is checked here, by the
        same rules the validator runs; each tensor's values are checked when it is first read
        (by :meth:`block`), or all at once with ``check_values=True``.

        Args:
            path: The artifact folder.
            verify_checksums: Hash every file and compare with the manifest; the files stay mapped,
                so the artifact reads the bytes hashed even if the folder or a file is replaced
                afterwards (not if a file is rewritten in place).
            check_values: Read every tensor now and check its values.
            max_bytes: Refuse an artifact whose manifest declares more bytes than this (before
                hashing or mapping anything).

        Raises:
            ArtifactNotFoundError: no artifact at ``path``.
            UnsupportedVersionError: the artifact's major spec version is not ours.
            ArtifactError: anything else the spec forbids (the first finding; run the validator
                for all of them).

        """
        folder = Path(path)
        sink = FirstError()
        reading = read(folder, sink, checksums=verify_checksums, values=check_values, max_bytes=max_bytes)
        assert reading is not None  # FirstError raised otherwise
        tensors = reading.tensors or DiskTensors(reading, sink)
        if verify_checksums:
            tensors.pin()  # the bytes hashed stay the bytes read, whatever replaces the folder later
        return cls(reading.manifest, tensors, folder, sink)

    def tensor(self, key: str) -> Tensor:
        """One stored tensor, as stored."""
        return self._tensors(key)

    def module(self, name: str) -> ModuleEntry:
        """The manifest entry of a module, with an error naming the known ones."""
        try:
            return self.manifest.modules[name]
        except KeyError:
            known = ", ".join(list(self.manifest.modules)[:5])
            raise ArtifactError(f"no module {name!r} in the artifact (it has {known}, ...)") from None

    def block(
        self,
        module: str,
        dataset: str | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Block:
        """The precision of one module: a weight block, or a LoRA pair block.

        Args:
            module: The base model's module name.
            dataset: One dataset's block; ``None`` combines all as the manifest says (summed,
                with each dataset's weight when they are stored separately).
            dtype: Dtype of the returned tensors (penalties accumulate in float32 by default).
            device: Where the tensors go.

        """
        entry = self.module(module)
        get = as_dtype(self._tensors, dtype, device)
        weights = {d.name: d.weight for d in self.manifest.datasets}
        groups: dict[str | None, list[Any]] = {}
        for block in entry.blocks:
            if dataset is None or block.dataset == dataset:
                groups.setdefault(block.dataset, []).append(block)
        if not groups:
            raise ArtifactError(f"module {module!r} has no block for dataset {dataset!r}")
        blocks = [self._decode(entry, group, get) for group in groups.values()]
        if len(blocks) == 1 and (dataset is not None or None in groups):
            return blocks[0]
        scaled = [b.scale(weights[name]) if weights[name] != 1.0 else b for name, b in zip(groups, blocks, strict=True)]  # type: ignore[index]
        total = scaled[0]
        for b in scaled[1:]:
            total = total + b
        return total

    def _decode(self, module: ModuleEntry, entries: list[Any], get: Callable[[str], Tensor]) -> Block:
        """One dataset's block: its single entry's, or the LoRA pair of its ``lora_A`` and ``lora_B`` entries."""
        at = Context.of(self.manifest, module)
        decoded = {e.param: codec_for(e).decode(e, at, get, self._sink) for e in entries}
        if "lora_A" not in decoded and "lora_B" not in decoded:
            return next(iter(decoded.values()))
        a, b = decoded["lora_A"], decoded["lora_B"]
        if not (isinstance(a, WeightBlock) and isinstance(b, WeightBlock)):
            raise StructureError("a LoRA pair stored as lora_A and lora_B needs a single-matrix block for each")
        return LoraPairBlock(a, b)

    def lora_init(self, module: str) -> tuple[Tensor, Tensor]:
        """The stored LoRA init ``(A₀, B₀)`` of a module (lora parameterization only)."""
        init = self.module(module).lora_init
        if init is None:
            raise ArtifactError(f"module {module!r} has no LoRA init: the artifact is weight-parameterized")
        return self._tensors(init.lora_A), self._tensors(init.lora_B)

    def tensors(self) -> dict[str, Tensor]:
        """Every referenced tensor, loaded (for saving a copy)."""
        return {key: self._tensors(key) for key in expected_tensors(self.manifest)}

    def nbytes(self, module: str | None = None) -> int:
        """Bytes stored for one module's tensors, or for all (shared tensors counted once)."""
        sizes = self.nbytes_by_module()
        if module is None:
            return sum(sizes.values())
        self.module(module)  # an unknown name is an error that lists the known ones
        return sizes[module]

    def nbytes_by_module(self) -> dict[str, int]:
        """Bytes stored per module; a shared tensor counts for the first module that references it."""
        sizes = dict.fromkeys(self.manifest.modules, 0)
        for spec in expected_tensors(self.manifest).values():
            sizes[spec.module] += tensor_dtype(spec.dtype).itemsize * math.prod(spec.shape)
        return sizes

    def save(
        self,
        path: str | Path,
        *,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        overwrite: bool = False,
        verify: bool = False,
    ) -> Artifact:
        """Write the artifact to a folder atomically (sharded above ``max_shard_bytes``).

        Args:
            path: The folder to create.
            max_shard_bytes: Shard above this many bytes.
            overwrite: Replace an existing folder.
            verify: Read it back with every rule, checksums and values included (one validation).

        Returns:
            The artifact opened from its new folder.

        Raises:
            ArtifactError: ``path`` exists and ``overwrite`` is not set, or (``verify``) the written
                artifact breaks a rule: then nothing appears at ``path``.

        """
        target = Path(path)
        if not verify:
            write_artifact(self.manifest, self._tensors, target, max_shard_bytes=max_shard_bytes, overwrite=overwrite)
            return Artifact.open(target)
        if os.path.lexists(target) and not overwrite:
            raise ArtifactError("already exists; pass `overwrite` to replace it", location=str(target))
        # Verified in a hidden sibling, then renamed into place: a folder that fails never appears.
        with staging_folder(target, "verify") as staging:
            staged = staging / "artifact"
            write_artifact(self.manifest, self._tensors, staged, max_shard_bytes=max_shard_bytes)
            Artifact.open(staged, verify_checksums=True, check_values=True)
            replace_folder(staged, target)
        return Artifact.open(target)
