"""The base-model fingerprints of SPEC.md §7: ``sha256-f32-v2`` (one digest per module), and ``v1`` to check old ones.

``v2`` lets a fine-tuner check exactly the modules its adapter covers; ``v1`` is one hash over every
module, which 1.0–1.2 artifacts carry and readers still check when the model holds all those modules.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from laplace_hub.linear import full_weight
from laplace_hub.manifest import Fingerprint

ALGORITHM: Literal["sha256-f32-v2"] = "sha256-f32-v2"


def module_digest(weight: Tensor) -> str:
    """sha256 of one module: ``d_out``, ``d_in`` as little-endian uint64, then ``W`` as float32 LE, row-major."""
    digest = hashlib.sha256()
    _update(digest, weight)
    return digest.hexdigest()


def root_digest(digests: Mapping[str, str]) -> str:
    """The ``value`` of a v2 fingerprint: sha256 over the modules in UTF-8 byte order of their names.

    Each contributes its name's UTF-8 length (uint64 LE), the name, and its digest's 32 bytes.
    """
    root = hashlib.sha256()
    for name in sorted(digests, key=str.encode):
        encoded = name.encode()
        root.update(struct.pack("<Q", len(encoded)) + encoded + bytes.fromhex(digests[name]))
    return root.hexdigest()


def fingerprint_weights(weights: Mapping[str, Tensor]) -> Fingerprint:
    """The v2 fingerprint of module name → weight ``W`` (``d_out × d_in``).

    Example:
        >>> import torch
        >>> fingerprint_weights({"lin": torch.zeros(2, 3)}).modules["lin"][:12]
        '9298a62c7efe'

    """
    return _fingerprint(weights, weights.__getitem__)


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
    return _fingerprint(modules, lambda name: full_weight(modules[name], name))


def legacy_fingerprint(modules: Mapping[str, nn.Module]) -> Fingerprint:
    """The ``sha256-f32-v1`` hash of 1.0–1.2 artifacts: every module, names in code-point order, one digest."""
    digest = hashlib.sha256()
    for name in sorted(modules):
        digest.update(name.encode() + b"\x00")
        _update(digest, full_weight(modules[name], name))
    return Fingerprint(algorithm="sha256-f32-v1", value=digest.hexdigest())


def differing_modules(
    fingerprint: Fingerprint, covered: Mapping[str, nn.Module], every: Mapping[str, nn.Module] | None
) -> list[str] | None:
    """The covered modules whose base weights differ from those the fingerprint was taken at.

    Args:
        fingerprint: The artifact's.
        covered: The modules to check (an adapter's), by the artifact's names.
        every: The model's modules for every name the artifact covers, adapted or not; ``None`` when
            the model lacks one. Only a ``v1`` fingerprint (one hash over all of them) needs it.

    Returns:
        The differing names (``v1``: all of ``covered``, or none), or ``None`` when a ``v1``
        fingerprint cannot be checked because ``every`` is ``None``.

    """
    if fingerprint.modules is not None:
        return [n for n in covered if fingerprint.modules.get(n) != module_digest(full_weight(covered[n], n))]
    if every is None:
        return None
    return [] if legacy_fingerprint(every).value == fingerprint.value else list(covered)


def _fingerprint(names: Iterable[str], weight: Callable[[str], Tensor]) -> Fingerprint:
    digests = {name: module_digest(weight(name)) for name in sorted(names)}
    return Fingerprint(algorithm=ALGORITHM, value=root_digest(digests), modules=digests)


def _update(digest: hashlib._Hash, weight: Tensor) -> None:
    weight = weight.detach()
    d_out, d_in = weight.shape
    digest.update(struct.pack("<QQ", d_out, d_in))
    digest.update(weight.to(device="cpu", dtype=torch.float32).contiguous().numpy().astype("<f4").tobytes())
