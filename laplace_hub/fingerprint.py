"""The base-model fingerprint ``sha256-f32-v1`` of SPEC.md §7."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from laplace_hub.linear import full_weight
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
        _update(digest, name, weights[name])
    return Fingerprint(algorithm=ALGORITHM, value=digest.hexdigest())


def fingerprint_modules(modules: Mapping[str, nn.Module]) -> Fingerprint:
    """:func:`fingerprint_weights` of linear modules' whole weights, one module's weight held at a time.

    A weight sharded by FSDP2 is all-gathered, one offloaded by accelerate is loaded, each only while
    it is hashed (:func:`~laplace_hub.linear.full_weight`), so no rank ever holds the whole model.
    Under FSDP2 every rank must call this with the same modules.

    Example:
        >>> from torch import nn
        >>> lin = nn.Linear(3, 2, bias=False)
        >>> _ = nn.init.zeros_(lin.weight)
        >>> fingerprint_modules({"lin": lin}) == fingerprint_weights({"lin": torch.zeros(2, 3)})
        True

    """
    digest = hashlib.sha256()
    for name in sorted(modules):
        _update(digest, name, full_weight(modules[name], name))
    return Fingerprint(algorithm=ALGORITHM, value=digest.hexdigest())


def _update(digest: hashlib._Hash, name: str, weight: Tensor) -> None:
    weight = weight.detach()
    d_out, d_in = weight.shape
    digest.update(name.encode() + b"\x00" + struct.pack("<QQ", d_out, d_in))
    digest.update(weight.to(device="cpu", dtype=torch.float32).contiguous().numpy().astype("<f4").tobytes())
