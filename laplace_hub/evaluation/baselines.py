"""The LaLoRA paper's baselines, each small and faithful to its defining mechanism.

* MiLoRA — LoRA initialised from the *minor* singular components of ``W`` (the base weight keeps
  the rest, so the model is unchanged at init).
* Flat-LoRA — a random perturbation of the merged weight at every step (noise per output row
  scaled by ``ρ`` and the row's norm), gradients taken at the perturbed point, weights restored.
* MIGU — only the output rows of each adapted layer whose normalised output magnitude is in the
  top ``t`` fraction are updated; the other rows' gradients are zeroed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from laplace_hub.consumers import adapted_modules


@torch.no_grad()
def milora_init(model: nn.Module, adapter: str = "default") -> int:
    """Re-initialise every LoRA layer from the minor singular triplets of its base weight.

    With ``W = U S Vᵀ`` and the ``r`` smallest triplets ``(Uₘ, Sₘ, Vₘ)``: ``A = √(Sₘ/s) Vₘᵀ``,
    ``B = Uₘ √(Sₘ/s)`` and the base weight becomes ``W − s·B A``, so ``W_base + s·B A = W``.

    Returns:
        The number of layers initialised.

    """
    count = 0
    for m in adapted_modules(model, adapter):
        weight = m.base_weight
        u, s_values, vh = torch.linalg.svd(weight.double(), full_matrices=False)
        r = m.lora_a.shape[0]
        root = (s_values[-r:] / m.scaling).sqrt()
        a, b = root[:, None] * vh[-r:], u[:, -r:] * root[None, :]
        m.lora_a.copy_(a)
        m.lora_b.copy_(b)
        weight.copy_(weight.double() - m.scaling * b @ a)
        count += 1
    return count


class FlatLoRA:
    """Perturb the merged weights for one step: ``ε_i ~ N(0, (ρ·‖W_i‖ / √d_in)²)`` on row ``i``."""

    def __init__(self, model: nn.Module, rho: float, seed: int = 0, adapter: str = "default") -> None:
        self.modules = list(adapted_modules(model, adapter))
        self.rho = rho
        self.generator = torch.Generator().manual_seed(seed)

    @contextmanager
    def perturbed(self) -> Iterator[None]:
        """Forward and backward inside this block see perturbed weights; they are restored exactly."""
        saved: list[Tensor] = []
        with torch.no_grad():
            for m in self.modules:
                weight = m.base_weight
                saved.append(weight.detach().clone())
                merged = weight + m.scaling * m.lora_b @ m.lora_a
                std = self.rho * merged.norm(dim=1, keepdim=True) / math.sqrt(weight.shape[1])
                noise = torch.randn(weight.shape, generator=self.generator).to(weight) * std
                weight.add_(noise)
        try:
            yield
        finally:
            with torch.no_grad():
                for m, original in zip(self.modules, saved, strict=True):
                    m.base_weight.copy_(original)


class MIGU:
    """Gradient gating by normalised output magnitude: call :meth:`mask_gradients` after backward."""

    def __init__(self, model: nn.Module, fraction: float, adapter: str = "default") -> None:
        self.modules = list(adapted_modules(model, adapter))
        self.fraction = fraction
        self.magnitudes: dict[int, Tensor] = {}
        self._handles = [m.layer.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]

    def _hook(self, index: int) -> Any:
        def record(module: nn.Module, inputs: Any, output: Tensor) -> None:
            magnitude = output.detach().abs().reshape(-1, output.shape[-1]).mean(0)
            self.magnitudes[index] = magnitude / magnitude.sum().clamp_min(1e-12)

        return record

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradient of every LoRA ``B`` row outside the top ``fraction`` by magnitude."""
        for index, m in enumerate(self.modules):
            grad = m.lora_b.grad
            if grad is None or index not in self.magnitudes:
                continue
            keep = max(1, math.ceil(self.fraction * grad.shape[0]))
            rows = torch.zeros(grad.shape[0], dtype=torch.bool, device=grad.device)
            rows[self.magnitudes[index].topk(keep).indices] = True
            grad[~rows] = 0

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
