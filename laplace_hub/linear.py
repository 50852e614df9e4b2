"""Linear modules as the spec sees them: ``y = x Wᵀ + b`` with ``W`` laid out ``[d_out, d_in]``.

``nn.Linear`` stores ``W`` in that layout; GPT-2's ``Conv1D`` (transformers) stores ``Wᵀ``, i.e.
``[d_in, d_out]``. Every place that needs a module's shape or weight (producers, the fingerprint,
consumers, the validator's model shapes) asks here, so the layout is decided once. So is where an
engine keeps a weight that is not whole on this process (:func:`full_weight`).

Example:
    >>> from torch import nn
    >>> linear_shape(nn.Linear(3, 2))
    (2, 3)

"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from laplace_hub.errors import LaplaceHubError


def _conv1d_type() -> type[nn.Module] | None:
    """The ``Conv1D`` class of transformers, if transformers has defined it (no instance can exist otherwise).

    Looking in ``sys.modules`` instead of importing keeps transformers an optional, unimported extra.
    """
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def is_transposed(module: nn.Module) -> bool:
    """Whether the module stores its weight as ``[d_in, d_out]`` (transformers' ``Conv1D``)."""
    conv1d = _conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or ``Conv1D``: the modules PEFT's ``all-linear`` adapts."""
    return isinstance(module, nn.Linear) or is_transposed(module)


def weight_out_in(module: nn.Module, name: str | None = None) -> Tensor:
    """The module's weight in the spec's ``[d_out, d_in]`` layout: a view, so in-place writes reach the module.

    Raises:
        LaplaceHubError: the module is not a linear module (``name``, if given, is the error's location).

    """
    weight = _stored_weight(module, name)
    return weight.T if is_transposed(module) else weight


def _stored_weight(module: nn.Module, name: str | None) -> Tensor:
    if not is_linear(module):
        raise LaplaceHubError(
            f"{type(module).__name__} is not a linear module; curvature covers nn.Linear and transformers' Conv1D",
            location=name,
        )
    weight = module.weight
    assert isinstance(weight, Tensor)
    return weight


def linear_shape(module: nn.Module, name: str | None = None) -> tuple[int, int]:
    """``(d_out, d_in)`` of a linear module, whatever its storage layout (refused as :func:`weight_out_in` does)."""
    d_out, d_in = weight_out_in(module, name).shape
    return int(d_out), int(d_in)


def full_weight(module: nn.Module, name: str | None = None) -> Tensor:
    """The module's whole weight as ``[d_out, d_in]``, detached, wherever an engine keeps it.

    * a plain module: its weight (a view, no copy);
    * PyTorch FSDP2 (``fully_shard``), whose weight is a sharded ``DTensor``: all-gathered, this
      module only. A collective: every rank must ask for the same modules in the same order;
    * accelerate with CPU or disk offload, whose weight is on the meta device outside a forward:
      loaded from the offload map onto the CPU, this module only (``align_module_device``).

    Raises:
        LaplaceHubError: the module is not linear, or its weight is on the meta device with no
            offload hook of its own to load it from (``name`` is the error's location).

    """
    weight = _stored_weight(module, name)
    if weight.is_meta:
        weight = _offloaded_weight(module, name)
    gather = getattr(weight, "full_tensor", None)  # a DTensor (torch.distributed.tensor)
    whole = gather() if callable(gather) else weight
    return (whole.T if is_transposed(module) else whole).detach()


def _offloaded_weight(module: nn.Module, name: str | None) -> Tensor:
    """The weight accelerate keeps in its offload map (CPU or disk), loaded onto the CPU."""
    modeling = sys.modules.get("accelerate.utils.modeling")  # loaded if accelerate placed the model
    if modeling is None or not modeling.has_offloaded_params(module):
        raise LaplaceHubError(
            "the weight is on the meta device and no accelerate offload hook of this module holds it (a model "
            "never loaded, or offloaded by a hook on a parent module); load the weights, or offload with "
            "from_pretrained(device_map=..., offload_folder=...) or accelerate.dispatch_model",
            location=name,
        )
    with modeling.align_module_device(module, torch.device("cpu")):
        weight = module.weight
    assert isinstance(weight, Tensor) and not weight.is_meta
    return weight
