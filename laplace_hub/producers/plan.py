"""Memory plans: split the target modules into groups whose running sums fit a byte budget.

Each group is one pass over the same batches (:func:`~laplace_hub.producers.compute_artifact`
with ``plan=``). A module's sums do not depend on which other modules are hooked, so any plan
gives the same artifact as one pass; only time (one forward and backward per pass) and memory
change. Modules that read one input tensor (q, k and v) share one input covariance, so they
always travel together; that sharing is found by tensor identity in one probe forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from laplace_hub.errors import LaplaceHubError
from laplace_hub.producers.accumulate import SharedInputs
from laplace_hub.producers.distributed import input_device
from laplace_hub.producers.options import ComputeOptions


@dataclass(frozen=True)
class PassPlan:
    """Groups of module names, one pass each, and the bytes each group's sums take."""

    groups: tuple[tuple[str, ...], ...]
    group_bytes: tuple[int, ...]
    budget: int | None = None

    @property
    def peak(self) -> int:
        """The predicted peak of the accumulator's sums: its largest group."""
        return max(self.group_bytes)

    def describe(self) -> str:
        """A few lines for a person: passes, modules per pass, predicted peak against the budget."""
        budget = "no budget" if self.budget is None else f"budget {_gib(self.budget)}"
        lines = [f"memory plan: {len(self.groups)} pass(es), predicted peak {_gib(self.peak)} of sums ({budget})"]
        for i, (group, size) in enumerate(zip(self.groups, self.group_bytes, strict=True), 1):
            lines.append(f"  pass {i}: {len(group)} module(s), {_gib(size)}")
        return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB"


def module_bytes(shape: tuple[int, int], owns_input: bool, options: ComputeOptions) -> int:
    """Bytes of one module's running sums (and sketch directions), as the accumulator holds them.

    Args:
        shape: The weight's ``(d_out, d_in)``.
        owns_input: Whether this module holds the input covariance it shares with others.
        options: What is computed, in which accumulation dtype.

    """
    d_out, d_in = shape
    item = torch.empty((), dtype=options.compute_dtype).element_size()
    if options.diagonal or options.estimator == "batch_empirical":
        lora = options.parameterization == "lora"
        sizes = [options.lora_rank * d_in, d_out * options.lora_rank] if lora else [d_out * d_in]
        return item * sum(n * (1 + 2 * options.sketch_size) for n in sizes)
    sides = [d_out, d_in] if owns_input else [d_out]
    if options.cov_sketch_size:
        return item * sum(2 * options.cov_sketch_size * d + 1 for d in sides)
    return item * sum(d * d for d in sides)


def input_owners(model: nn.Module, targets: Mapping[str, nn.Module], batch: Mapping[str, Tensor]) -> dict[str, str]:
    """Module → the first module that read the same input tensor, from one forward without gradients."""
    owners: dict[str, str] = {}
    seen = SharedInputs()

    def hook(name: str):  # type: ignore[no-untyped-def]
        def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            owners.setdefault(name, seen.owner(name, inputs[0]))

        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in targets.items()]
    device = input_device(model)
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    finally:
        seen.clear()
        for handle in handles:
            handle.remove()
    return {name: owners.get(name, name) for name in targets}


def plan_passes(
    shapes: Mapping[str, tuple[int, int]], owners: Mapping[str, str], options: ComputeOptions, budget: int | None
) -> PassPlan:
    """Pack modules (with the modules they share an input with) into passes, largest first.

    First-fit decreasing: each unit goes into the first pass it fits, else opens a new one.

    Raises:
        LaplaceHubError: One unit alone exceeds the budget (located at ``max_memory``).

    """
    units: dict[str, list[str]] = {}
    for name in shapes:
        units.setdefault(owners.get(name, name), []).append(name)
    sized = [
        (sum(module_bytes(shapes[n], n == owner, options) for n in names), names) for owner, names in units.items()
    ]
    sized.sort(key=lambda unit: -unit[0])
    groups: list[list[str]] = []
    sizes: list[int] = []
    for size, names in sized:
        if budget is not None and size > budget:
            raise LaplaceHubError(
                f"the sums of {', '.join(names)} take {_gib(size)}, over the budget of {_gib(budget)}; "
                "raise it, or sketch the factors (kron with a rank and eig_sketch)",
                location="max_memory",
            )
        fits = next((i for i, held in enumerate(sizes) if budget is None or held + size <= budget), None)
        if fits is None:
            groups.append([])
            sizes.append(0)
            fits = len(groups) - 1
        groups[fits] += names
        sizes[fits] += size
    return PassPlan(tuple(tuple(g) for g in groups), tuple(sizes), budget)


def default_budget(device: torch.device) -> int | None:
    """Half the memory free on ``device`` now (the rest is for activations); ``None`` if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024 // 2
    except (OSError, KeyError, ValueError):
        return None
