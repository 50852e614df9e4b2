"""The LaLoRA penalty ``λ/2 · Σ_modules vec(Δ)ᵀ P vec(Δ)`` for a PEFT LoRA model, from an artifact."""

from __future__ import annotations

import inspect
import json
import logging
import math
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from laplace_hub.artifact import Artifact
from laplace_hub.consumers.provenance import ArtifactSource, artifact_source
from laplace_hub.curvature import (
    Block,
    BlockSum,
    EigenFactor,
    KronBlock,
    LoraPairBlock,
    WeightBlock,
    signature,
    stack_blocks,
)
from laplace_hub.errors import LaplaceHubError, ModelMismatchError
from laplace_hub.fingerprint import differing_modules
from laplace_hub.linear import weight_out_in
from laplace_hub.manifest import LoraParameterization

logger = logging.getLogger(__name__)
Mode = Literal["weight", "lora_init"]
STATE_FILE = "laplace_regularizer.safetensors"
STATE_META = "laplace_regularizer.json"


@dataclass
class AdaptedModule:
    """One PEFT LoRA layer: its base name (as in the artifact) and its adapter's factors."""

    name: str
    layer: nn.Module
    adapter: str

    @property
    def lora_a(self) -> Tensor:
        return self.layer.lora_A[self.adapter].weight  # type: ignore[index,union-attr]

    @property
    def lora_b(self) -> Tensor:
        return self.layer.lora_B[self.adapter].weight  # type: ignore[index,union-attr]

    @property
    def scaling(self) -> float:
        return float(self.layer.scaling[self.adapter])  # type: ignore[index]

    @property
    def base_layer(self) -> nn.Module:
        """The adapted base module (its weight may be FSDP2's shard: :func:`~laplace_hub.linear.full_weight`)."""
        return self.layer.base_layer  # type: ignore[return-value]

    @property
    def base_weight(self) -> Tensor:
        """The base weight as ``[d_out, d_in]`` (a view of a ``Conv1D``'s), the layout of ``B A`` and the artifact."""
        return weight_out_in(self.base_layer, self.name)


def adapted_modules(model: nn.Module, adapter: str = "default") -> Iterator[AdaptedModule]:
    """Every LoRA layer of ``adapter`` with the name its base module has in the base model."""
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer") and adapter in module.lora_A:
            yield AdaptedModule(name.removeprefix("base_model.model."), module, adapter)


def check_base_weights(artifact: Artifact, model: nn.Module, covered: dict[str, nn.Module]) -> None:
    """Refuse base weights that differ from the artifact's fingerprint, naming the modules (SPEC.md §7).

    A ``v2`` fingerprint checks exactly the ``covered`` modules; a ``v1`` one (1.0–1.2 artifacts) is
    one hash over every module of the artifact, taken from the model whether adapted or not, and
    only warned about when the model lacks one of them.
    """
    fingerprint = artifact.manifest.base_model.fingerprint
    if fingerprint is None or not covered:
        return
    every = _base_modules(model, artifact.manifest.modules) if fingerprint.modules is None else None
    differing = differing_modules(fingerprint, covered, every)
    if differing is None:
        logger.warning(
            "the base weights cannot be checked: the artifact's sha256-f32-v1 fingerprint covers modules the "
            "model does not have; recompute the artifact (spec 1.3 fingerprints each module)"
        )
    elif differing:
        shown = ", ".join(differing[:3]) + (f" and {len(differing) - 3} more" if len(differing) > 3 else "")
        raise ModelMismatchError(
            f"the base weights of {len(differing)} module(s) differ from those the artifact was computed at "
            f"(fingerprint mismatch: {shown}); load the same base model and revision"
            + (
                " (a continual posterior: the weights after its latest task, with earlier adapters merged)"
                if artifact.manifest.lineage
                else ""
            )
            + ", or pass check_fingerprint=False",
            location=artifact.manifest.base_model.repo_id,
        )


def _base_modules(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module] | None:
    """The model's base module of every name (a PEFT layer's ``base_layer``), or ``None`` if one is missing."""
    found = {}
    for name in names:
        for path in (f"base_model.model.{name}", name):
            try:
                module = model.get_submodule(path)
            except AttributeError:
                continue
            found[name] = getattr(module, "base_layer", module)
            break
        else:
            return None
    return found


def identity_block(d_out: int, d_in: int, device: torch.device | None = None) -> KronBlock:
    """``P = I``: the L2 baseline, as a Kronecker block of two identity factors (nothing stored)."""

    def eye(n: int) -> EigenFactor:
        return EigenFactor(torch.zeros(n, 0, device=device), torch.zeros(0, device=device), 1.0)

    return KronBlock(eye(d_in), eye(d_out))


class LaplaceRegularizer(nn.Module):
    """``λ/2 · Σ vec(Δ)ᵀ P vec(Δ)`` over a PEFT model's LoRA layers; call it for the penalty.

    * ``mode="weight"``: ``Δ = s·B A`` at every step, through the weight-space block (Kronecker
      blocks never form ``Δ``).
    * ``mode="lora_init"``: the paper's LaLoRA: ``Δ = (A − A₀, B − B₀)`` with the precision
      projected once onto the LoRA factors at their init (or taken as stored from a
      ``lora``-parameterised artifact, whose init the model must carry).

    Build it with :meth:`from_artifact` or :meth:`identity`. It remembers which prior it holds
    (``prior``, and the artifact's origin in ``source``), for the adapter's provenance record
    (:func:`~laplace_hub.consumers.write_provenance`).
    """

    def __init__(
        self,
        modules: list[AdaptedModule],
        blocks: list[Block],
        strength: float,
        mode: Mode,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if not (isinstance(strength, (int, float)) and math.isfinite(strength) and strength >= 0):
            # a negative λ rewards moving along the source's sharp directions: forgetting, by design
            raise LaplaceHubError(f"must be a finite number ≥ 0, got {strength!r}", location="strength")
        self.strength = strength
        self.mode = mode
        self.dtype = dtype
        self._modules_list = modules
        self.adapter = modules[0].adapter if modules else "default"
        self.prior: Literal["artifact", "identity", "custom"] = "custom"
        self.source: ArtifactSource | None = None  # the artifact's origin and contents (from_artifact)
        # Modules of one structure and shape are evaluated as one stacked block: a few kernels
        # per step instead of several per module.
        grouped: dict[Hashable, list[int]] = {}
        for i, (m, block) in enumerate(zip(modules, blocks, strict=True)):
            grouped.setdefault((signature(block), m.lora_a.shape, str(m.lora_a.device)), []).append(i)
        self._groups = [[modules[i] for i in members] for members in grouped.values()]
        self._blocks = [stack_blocks([blocks[i] for i in members]) for members in grouped.values()]
        for g, group in enumerate(self._groups):
            scaling = torch.tensor([m.scaling for m in group], device=group[0].lora_a.device, dtype=dtype)[
                :, None, None
            ]
            self.register_buffer(f"scaling_{g}", scaling, persistent=False)
            if mode == "lora_init":
                # The prior mean (A₀, B₀) is state: buffers, so that it is saved with the regularizer.
                self.register_buffer(f"anchor_a_{g}", self._stacked(group, "lora_a").detach().clone())
                self.register_buffer(f"anchor_b_{g}", self._stacked(group, "lora_b").detach().clone())

    def _stacked(self, group: list[AdaptedModule], factor: str) -> Tensor:
        return torch.stack([getattr(m, factor) for m in group]).to(self.dtype)

    @classmethod
    def from_artifact(
        cls,
        artifact: Artifact,
        model: nn.Module,
        *,
        strength: float,
        mode: Mode = "weight",
        adapter: str = "default",
        on_unmatched: Literal["warn", "error", "ignore"] = "warn",
        check_fingerprint: bool = True,
        cross: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> LaplaceRegularizer:
        """Match the artifact's modules to the model's LoRA layers and load their blocks once.

        Only the blocks of adapted modules are read, each onto its adapter's device.

        Args:
            artifact: The curvature artifact.
            model: A PEFT model (or any model with PEFT LoRA layers).
            strength: ``λ``; with ``per_sequence`` normalisation it reads as the number of source
                sequences the prior is worth.
            mode: ``weight`` (default) or ``lora_init``.
            adapter: The PEFT adapter to regularise.
            on_unmatched: What to do with modules adapted but not in the artifact, or the reverse.
            check_fingerprint: Refuse a base model whose covered weights differ from the artifact's.
            cross: In ``lora_init`` mode with a Kronecker weight artifact, keep the A–B cross block
                (B-Tri-K-FAC).
            dtype: What the blocks are held and the penalty computed in. float32 by default;
                bfloat16 halves the memory of large dense factors at about 3 significant digits.

        Raises:
            ModelMismatchError: shapes, fingerprint or LoRA init differ, or nothing matches.

        """
        lora = artifact.manifest.parameterization
        if isinstance(lora, LoraParameterization) and mode != "lora_init":
            raise LaplaceHubError("a lora-parameterised artifact is used with mode='lora_init'")
        modules = [m for m in adapted_modules(model, adapter) if m.name in artifact.manifest.modules]
        _report_unmatched(artifact, model, adapter, modules, on_unmatched)
        for m in modules:
            if list(m.base_weight.shape) != artifact.manifest.modules[m.name].shape:
                raise ModelMismatchError(
                    f"shape {list(m.base_weight.shape)} differs from the artifact's "
                    f"{artifact.manifest.modules[m.name].shape}",
                    location=m.name,
                )
        if check_fingerprint:
            check_base_weights(artifact, model, {m.name: m.base_layer for m in modules})
        blocks: list[Block] = []
        for m in modules:
            block = artifact.block(m.name, dtype=dtype, device=m.lora_a.device)
            if isinstance(lora, LoraParameterization):
                _check_init(artifact, m)
            elif mode == "lora_init":
                assert isinstance(block, WeightBlock | BlockSum)  # a sum: separate datasets, merged tasks
                a0, b0 = m.lora_a.detach().to(dtype), m.lora_b.detach().to(dtype)
                block = block.project_lora(a0, b0, m.scaling, cross=cross)
            blocks.append(block)
        regularizer = cls(modules, blocks, strength, mode, dtype)
        regularizer.prior, regularizer.source = "artifact", artifact_source(artifact)
        return regularizer

    @classmethod
    def from_pretrained(
        cls, repo_id: str, *, model: nn.Module, strength: float, mode: Mode = "weight", **kwargs: Any
    ) -> LaplaceRegularizer:
        """The fine-tuner's one-liner: pull an artifact by repo id and build the regularizer for ``model``.

        ``kwargs`` named like :meth:`from_artifact`'s (``adapter``, ``on_unmatched``,
        ``check_fingerprint``, ``cross``) go there; the rest (``revision``, ``subfolder``, ``hub``, …)
        to :func:`laplace_hub.hub.pull`, so one call can steer both.
        """
        own = inspect.signature(cls.from_artifact).parameters.keys() - {"artifact", "model", "strength", "mode"}
        consumer = {key: kwargs.pop(key) for key in own & kwargs.keys()}
        artifact = Artifact.from_pretrained(repo_id, **kwargs)
        return cls.from_artifact(artifact, model, strength=strength, mode=mode, **consumer)

    @classmethod
    def identity(
        cls, model: nn.Module, *, strength: float, mode: Mode = "weight", adapter: str = "default"
    ) -> LaplaceRegularizer:
        """The L2 baseline with the same interface: ``P = I`` on ``Δ`` (weight) or on the factors."""
        modules = list(adapted_modules(model, adapter))
        blocks = [
            _identity_pair(m) if mode == "lora_init" else identity_block(*_dims(m), m.lora_a.device) for m in modules
        ]
        regularizer = cls(modules, blocks, strength, mode)
        regularizer.adapter, regularizer.prior = adapter, "identity"
        return regularizer

    @property
    def num_modules(self) -> int:
        """How many LoRA modules the penalty covers."""
        return len(self._modules_list)

    def forward(self) -> Tensor:
        """The penalty, a scalar (in ``dtype``) differentiable in the LoRA factors."""
        terms = []
        for g, (group, block) in enumerate(zip(self._groups, self._blocks, strict=True)):
            a, b = self._stacked(group, "lora_a"), self._stacked(group, "lora_b")
            if self.mode == "weight":
                terms.append(block.quad_lowrank(getattr(self, f"scaling_{g}") * b, a))  # type: ignore[attr-defined]
            else:
                terms.append(block.quad(a - getattr(self, f"anchor_a_{g}"), b - getattr(self, f"anchor_b_{g}")))
        if not terms:
            return torch.zeros(())
        return 0.5 * self.strength * torch.stack(terms).sum()

    def save(self, folder: str | Path) -> None:
        """Write what resuming needs (strength, mode, module names, LoRA-init anchors) to ``folder``.

        The curvature itself stays in its artifact; the anchors are the only state training cannot
        recompute, since by then the LoRA factors have moved.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / STATE_FILE)
        meta = {"strength": self.strength, "mode": self.mode, "modules": [m.name for m in self._modules_list]}
        (folder / STATE_META).write_text(json.dumps(meta, indent=2) + "\n")

    def load(self, folder: str | Path) -> None:
        """Restore what :meth:`save` wrote; refuses state written for other modules or another mode."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / STATE_META).read_text())
            state = load_file(folder / STATE_FILE)
        except (OSError, ValueError) as e:
            raise LaplaceHubError(f"no readable regularizer state in {folder}: {e}") from e
        names = [m.name for m in self._modules_list]
        if meta.get("mode") != self.mode or meta.get("modules") != names:
            raise ModelMismatchError(
                f"regularizer state is for mode {meta.get('mode')!r} over {len(meta.get('modules', []))} modules; "
                f"this one is {self.mode!r} over {len(names)}",
                location=str(folder),
            )
        self.load_state_dict(state)
        self.strength = float(meta["strength"])

    def extra_repr(self) -> str:
        modules, groups = len(self._modules_list), len(self._groups)
        return f"strength={self.strength}, mode={self.mode!r}, modules={modules}, groups={groups}"


def _identity_pair(m: AdaptedModule) -> Block:
    r, (d_out, d_in) = m.lora_a.shape[0], _dims(m)
    return LoraPairBlock(identity_block(r, d_in, m.lora_a.device), identity_block(d_out, r, m.lora_a.device))


def _dims(m: AdaptedModule) -> tuple[int, int]:
    d_out, d_in = m.base_weight.shape
    return int(d_out), int(d_in)


def _check_init(artifact: Artifact, m: AdaptedModule) -> None:
    a0, b0 = artifact.lora_init(m.name)
    if a0.shape != m.lora_a.shape or not (
        torch.equal(a0.to(m.lora_a), m.lora_a.detach()) and torch.equal(b0.to(m.lora_b), m.lora_b.detach())
    ):
        raise ModelMismatchError(
            "the model's LoRA init differs from the artifact's; call apply_lora_init(model, artifact) "
            "right after get_peft_model",
            location=m.name,
        )


def apply_lora_init(model: nn.Module, artifact: Artifact, adapter: str = "default") -> int:
    """Copy a ``lora``-parameterised artifact's stored init into the model's LoRA factors.

    Returns:
        The number of modules initialised.

    """
    count = 0
    with torch.no_grad():
        for m in adapted_modules(model, adapter):
            if m.name in artifact.manifest.modules:
                a0, b0 = artifact.lora_init(m.name)
                if a0.shape != m.lora_a.shape or b0.shape != m.lora_b.shape:
                    raise ModelMismatchError(
                        f"LoRA shapes {list(m.lora_a.shape)}/{list(m.lora_b.shape)} differ from the artifact's "
                        f"{list(a0.shape)}/{list(b0.shape)} (rank?)",
                        location=m.name,
                    )
                m.lora_a.copy_(a0)
                m.lora_b.copy_(b0)
                count += 1
    return count


def _report_unmatched(
    artifact: Artifact, model: nn.Module, adapter: str, matched: list[AdaptedModule], policy: str
) -> None:
    adapted = {m.name for m in adapted_modules(model, adapter)}
    if not adapted:
        raise ModelMismatchError(f"the model has no LoRA layers for adapter {adapter!r}")
    if not matched:
        raise ModelMismatchError(
            f"no adapted module is in the artifact (adapted: {sorted(adapted)[:3]}, artifact: "
            f"{list(artifact.manifest.modules)[:3]})"
        )
    missing = sorted(adapted - set(artifact.manifest.modules))
    unused = sorted(set(artifact.manifest.modules) - adapted)
    message = (
        f"{len(missing)} adapted module(s) have no curvature (unregularised), e.g. {missing[:2]}; "
        f"{len(unused)} artifact module(s) are not adapted, e.g. {unused[:2]}"
    )
    if (missing or unused) and policy == "error":
        raise ModelMismatchError(message)
    if missing or unused:
        (logger.warning if policy == "warn" else logger.debug)(message)
