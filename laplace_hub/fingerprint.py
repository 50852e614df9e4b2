"""The base-model fingerprint ``sha256-f32-v1`` of SPEC.md §7."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from laplace_hub.manifest import Fingerprint

ALGORITHM: Literal["sha256-f32-v1"] = "sha256-f32-v1"


def fingerprint_weights(weights: Mapping[str, Tensor]) -> Fingerprint:
    """Fingerprint of module name → weight ``W`` (``d_out × d_in``), as SPEC.md §7 defines it.

    Example:
        >>> import torch
        >>> fingerprint_weights({"lin": torch.zeros(2, 3)}).value[:12]
        '16af6bbb4ea6'

    """
    digest = hashlib.sha256()
    for name in sorted(weights):
        weight = weights[name].detach()
        d_out, d_in = weight.shape
        digest.update(name.encode() + b"\x00" + struct.pack("<QQ", d_out, d_in))
        digest.update(weight.to(device="cpu", dtype=torch.float32).contiguous().numpy().astype("<f4").tobytes())
    return Fingerprint(algorithm=ALGORITHM, value=digest.hexdigest())
