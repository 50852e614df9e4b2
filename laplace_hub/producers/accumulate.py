"""Hooks on ``nn.Linear`` that accumulate diagonal or Kronecker curvature sums.

One backward of the summed log-likelihood of a batch gives, at every target module, the input
``x`` (B, T, d_in) and the output gradient ``g`` (B, T, d_out) of each sequence's own
log-likelihood (sequences do not interact). Everything SPEC.md §6 defines follows from these two
tensors without a Python loop over examples; per-sequence gradients ``gᵀ x`` are formed in chunks
so that memory is bounded by the chunk, not by the data seen.

A LoRA factor is itself a linear map, so its diagonal uses the same formulas on transformed pairs:
``A`` sees ``(x, s·g B₀)`` and ``B`` sees ``(x A₀ᵀ, s·g)``. For ``diag_lowrank`` the same
per-example gradients also feed a Nyström sketch ``F Ω`` (:mod:`laplace_hub.curvature.sketch`);
for a sketched ``kron_eig`` the covariances themselves are only ever held as ``Σ x xᵀ Ω`` and
``Σ g gᵀ Ω`` (``O(d·s)`` instead of ``O(d²)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import torch
from torch import Tensor, nn

from laplace_hub.curvature.sketch import random_directions
from laplace_hub.manifest import KfacApprox, Normalization

Structure = Literal["diag", "kron"]
CHUNK = 4


@dataclass(frozen=True)
class LoraInit:
    """The LoRA init of one module, ``ΔW = scaling · B A``."""

    a: Tensor
    b: Tensor
    scaling: float


@dataclass(frozen=True)
class ParameterSums:
    """One parameter's sums for a diagonal structure: ``Σₙ gₙ²`` and, for ``diag_lowrank``, ``Σₙ gₙ (gₙᵀ Ω)``."""

    diagonal: Tensor
    sketch: Tensor | None = None
    directions: Tensor | None = None  # Ω, the same on every rank


@dataclass(frozen=True)
class SketchSums:
    """A covariance ``C = Σ v vᵀ`` held as ``Ω C`` (``s × d``) and ``tr C``; ``Ω`` is the same on every rank."""

    product: Tensor
    trace: Tensor
    directions: Tensor

    def to(self, device: torch.device | str) -> SketchSums:
        return SketchSums(self.product.to(device), self.trace.to(device), self.directions.to(device))


Covariance = Tensor | SketchSums


@dataclass(frozen=True)
class ModuleSums:
    """What the hooks summed at one module, not yet divided by any count (SPEC.md §6).

    ``kron`` fills ``output`` (``Σ g gᵀ``) and, at the module whose input it is (``input_owner``:
    q, k and v read one tensor and share one input covariance), ``input`` (``Σ x xᵀ``). Diagonal
    structures fill ``parameters``: ``weight``, or ``lora_A`` and ``lora_B``.
    """

    input_owner: str
    input: Covariance | None = None
    output: Covariance | None = None
    parameters: Mapping[str, ParameterSums] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> ModuleSums:
        """The same sums on ``device``."""
        parameters = {
            key: ParameterSums(p.diagonal.to(device), _moved(p.sketch, device), _moved(p.directions, device))
            for key, p in self.parameters.items()
        }
        return ModuleSums(self.input_owner, _moved(self.input, device), _moved(self.output, device), parameters)

    def tensors(self) -> list[Tensor]:
        """The summed tensors in a fixed order, which every rank sums over the others (not Ω)."""
        summed: list[Tensor | None] = []
        for cov in (self.input, self.output):
            summed += [cov.product, cov.trace] if isinstance(cov, SketchSums) else [cov]
        for _, part in sorted(self.parameters.items()):
            summed += [part.diagonal, part.sketch]
        return [t for t in summed if t is not None]


class SharedInputs:
    """Which module first read each input tensor of one forward, by identity (q, k and v share one).

    The tensors are held until :meth:`clear`: a freed tensor's ``id`` may be reused by a later one,
    which would otherwise look shared.
    """

    def __init__(self) -> None:
        self._seen: dict[int, tuple[Tensor, str]] = {}

    def owner(self, name: str, tensor: Tensor) -> str:
        """The first module that read ``tensor`` (``name`` itself if none did before)."""
        return self._seen.setdefault(id(tensor), (tensor, name))[1]

    def clear(self) -> None:
        """Forget the forward (call before the next one)."""
        self._seen.clear()


@dataclass
class CurvatureAccumulator:
    """Running sums per module, read as :class:`ModuleSums` by :meth:`result`.

    Before each forward, call :meth:`new_batch` with the mask (B, T): 1 where the position predicts
    a labelled token. Then run forward and one backward of the summed log-likelihood per label
    draw, with the hooks attached; the input covariance is summed on the first backward only, since
    inputs do not depend on the labels. With ``cov_sketch_size`` > 0 the Kronecker covariances are
    sketched along that many seeded directions instead of summed in full.
    """

    modules: dict[str, nn.Linear]
    structure: Structure
    normalization: Normalization
    kfac_approx: KfacApprox = "expand"
    batch_gradient: bool = False
    lora: dict[str, LoraInit] = field(default_factory=dict)
    sketch_size: int = 0
    cov_sketch_size: int = 0
    seed: int = 0
    dtype: torch.dtype = torch.float32
    _mask: Tensor | None = field(default=None, init=False, repr=False)
    _inputs: dict[str, Covariance] = field(default_factory=dict, init=False, repr=False)
    _outputs: dict[str, Covariance] = field(default_factory=dict, init=False, repr=False)
    _diagonals: dict[tuple[str, str], Tensor] = field(default_factory=dict, init=False, repr=False)
    _sketches: dict[tuple[str, str], Tensor] = field(default_factory=dict, init=False, repr=False)
    _directions: dict[tuple[str, str], Tensor] = field(default_factory=dict, init=False, repr=False)
    _input_owner: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    _inputs_summed: set[str] = field(default_factory=set, init=False, repr=False)
    _handles: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list, init=False, repr=False)
    _seen_inputs: SharedInputs = field(default_factory=lambda: SharedInputs(), init=False, repr=False)

    def attach(self) -> None:
        """Register the forward hooks (they hook the outputs' gradients)."""
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def nbytes(self) -> int:
        """Bytes of every running sum (and sketch direction) held now: what a memory plan bounds."""
        held: list[Tensor] = [*self._diagonals.values(), *self._sketches.values(), *self._directions.values()]
        for cov in (*self._inputs.values(), *self._outputs.values()):
            held += [cov.product, cov.trace, cov.directions] if isinstance(cov, SketchSums) else [cov]
        return sum(t.numel() * t.element_size() for t in held)

    def result(self) -> dict[str, ModuleSums]:
        """The sums of every module; the tensors are the accumulator's own, so reducing them in place counts."""
        return {
            name: ModuleSums(
                self._input_owner.get(name, name),
                self._inputs.get(name),
                self._outputs.get(name),
                self._parameters(name),
            )
            for name in self.modules
        }

    def _parameters(self, name: str) -> dict[str, ParameterSums]:
        return {
            key[1]: ParameterSums(diagonal, self._sketches.get(key), self._directions.get(key))
            for key, diagonal in self._diagonals.items()
            if key[0] == name
        }

    def _hook(self, name: str):  # type: ignore[no-untyped-def]
        def forward_hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            x = inputs[0].detach()
            # Modules that read the same tensor (q/k/v) share one input covariance.
            self._input_owner.setdefault(name, self._seen_inputs.owner(name, inputs[0]))
            if output.requires_grad:
                output.register_hook(lambda g: self._add(name, x, g.detach()))

        return forward_hook

    def new_batch(self, mask: Tensor) -> None:
        """Set the label mask of the next forward."""
        self._mask = mask
        self._seen_inputs.clear()
        self._inputs_summed.clear()

    def _add(self, name: str, x: Tensor, g: Tensor) -> None:
        assert self._mask is not None, "call new_batch(mask) before the forward pass"
        mask = self._mask.to(x.device, self.dtype).unsqueeze(-1)
        x, g = x.to(self.dtype) * mask, g.to(self.dtype) * mask
        if self.structure == "kron" and not self.batch_gradient:
            self._add_cov(self._outputs, f"{name}.output", name, self._output_rows(g))
            if self._input_owner[name] == name and name not in self._inputs_summed:
                self._inputs_summed.add(name)
                self._add_cov(self._inputs, f"{name}.input", name, self._input_rows(x))
            return
        for param, (xp, gp) in self._param_pairs(name, x, g).items():
            if self.batch_gradient:
                _accumulate(self._diagonals, (name, param), torch.einsum("bto,bti->oi", gp, xp).square())
                continue
            omega = self._omega(name, param, gp, xp) if self.sketch_size else None
            diagonal, sketch = self._diagonal(xp, gp, omega)
            _accumulate(self._diagonals, (name, param), diagonal)
            if sketch is not None:
                _accumulate(self._sketches, (name, param), sketch)

    def _param_pairs(self, name: str, x: Tensor, g: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        init = self.lora.get(name)
        if init is None:
            return {"weight": (x, g)}
        a, b = init.a.to(self.dtype), init.b.to(self.dtype)
        return {"lora_A": (x, init.scaling * g @ b), "lora_B": (x @ a.T, init.scaling * g)}

    def _omega(self, name: str, param: str, g: Tensor, x: Tensor) -> Tensor:
        """The sketch's test directions ``Ω`` of one parameter, made once, where the gradients live."""
        if (name, param) not in self._directions:
            shape = (g.shape[-1], x.shape[-1])
            omega = random_directions(f"{name}.{param}", self.sketch_size, shape, self.seed, self.dtype)
            self._directions[(name, param)] = omega.to(g.device)
        return self._directions[(name, param)]

    def _diagonal(self, x: Tensor, g: Tensor, omega: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``Σₙ gₙ²`` over examples and, given test directions ``Ω``, the sketch ``Σₙ gₙ (gₙᵀ Ω)``."""
        if self.normalization == "per_token":
            diagonal = torch.einsum("bto,bti->oi", g.square(), x.square())
            if omega is None:
                return diagonal, None
            along = (torch.einsum("soi,bti->btso", omega, x) * g.unsqueeze(2)).sum(-1)
            return diagonal, torch.einsum("bts,bto,bti->soi", along, g, x)
        total = x.new_zeros(g.shape[-1], x.shape[-1])
        sketch = None if omega is None else x.new_zeros(omega.shape)
        for start in range(0, x.shape[0], CHUNK):
            per_sequence = torch.einsum("bto,bti->boi", g[start : start + CHUNK], x[start : start + CHUNK])
            total += per_sequence.square().sum(0)
            if sketch is not None and omega is not None:
                along = torch.einsum("boi,soi->bs", per_sequence, omega)
                sketch += torch.einsum("bs,boi->soi", along, per_sequence)
        return total, sketch

    def _output_rows(self, g: Tensor) -> Tensor:
        """The rows ``v`` whose ``Σ v vᵀ`` is the output covariance."""
        return g.sum(1) if self.kfac_approx == "reduce" else g.reshape(-1, g.shape[-1])

    def _input_rows(self, x: Tensor) -> Tensor:
        assert self._mask is not None
        if self.kfac_approx == "reduce":
            lengths = self._mask.to(x.device, self.dtype).sum(1, keepdim=True).clamp_min(1)
            return x.sum(1) / lengths
        return x.reshape(-1, x.shape[-1])

    def _add_cov(self, sums: dict[str, Covariance], seed_name: str, name: str, rows: Tensor) -> None:
        """Add ``rowsᵀ rows`` in full, or its sketch ``Ω rowsᵀ rows`` and trace."""
        if not self.cov_sketch_size:
            held = sums.get(name)
            if held is None:
                sums[name] = rows.T @ rows
            else:
                held.addmm_(rows.T, rows)  # type: ignore[union-attr]  # no product temporary
            return
        held = sums.get(name)
        if held is None:
            test = random_directions(seed_name, self.cov_sketch_size, (rows.shape[-1],), self.seed, self.dtype)
            held = sums[name] = SketchSums(rows.new_zeros(test.shape), rows.new_zeros(()), test.to(rows.device))
        assert isinstance(held, SketchSums)
        held.product.add_((rows @ held.directions.T).T @ rows)
        held.trace.add_(rows.square().sum())


K = TypeVar("K")
M = TypeVar("M", bound=Tensor | SketchSums)


def _moved(value: M | None, device: torch.device | str) -> M | None:
    return None if value is None else value.to(device)  # type: ignore[return-value]


def _accumulate(sums: dict[K, Tensor], key: K, value: Tensor) -> None:
    """Add in place: a fresh sum per batch would allocate (and page in) all the sums again each time."""
    if key in sums:
        sums[key].add_(value)
    else:
        sums[key] = value
