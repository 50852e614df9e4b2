"""Precision rules shared by producers and consumers."""

from __future__ import annotations

import torch
from torch import Tensor


def at_least_float32(t: Tensor) -> Tensor:
    """Float32 at least for log-probabilities (bf16 models), never below the input's precision."""
    return t.to(torch.promote_types(t.dtype, torch.float32))
