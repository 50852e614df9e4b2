"""Linear modules as the spec sees them: ``y = x Wᵀ + b`` with ``W`` laid out ``[d_out, d_in]``.

``nn.Linear`` stores ``W`` in that layout; GPT-2's ``Conv1D`` (transformers) stores ``Wᵀ``, i.e.
``[d_in, d_out]``. Every place that needs a module's shape or weight (producers, the fingerprint,
consumers, the validator's model shapes) asks here, so the layout is decided once.

Example:
    >>> from torch import nn
    >>> linear_shape(nn.Linear(3, 2))
    (2, 3)

"""

from __future__ import annotations

import sys

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
    if not is_linear(module):
        raise LaplaceHubError(
            f"{type(module).__name__} is not a linear module; curvature covers nn.Linear and transformers' Conv1D",
            location=name,
        )
    weight = module.weight
    assert isinstance(weight, Tensor)
    return weight.T if is_transposed(module) else weight


def linear_shape(module: nn.Module, name: str | None = None) -> tuple[int, int]:
    """``(d_out, d_in)`` of a linear module, whatever its storage layout (refused as :func:`weight_out_in` does)."""
    d_out, d_in = weight_out_in(module, name).shape
    return int(d_out), int(d_in)
