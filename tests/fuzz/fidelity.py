"""The fidelity oracle: a module's penalty from the stored numbers, read straight from the files.

SPEC.md §8.3 promises that a reader's penalty is the quadratic form of §5 over the *stored*
numbers, decoded as the spec says and no further: each dense factor's symmetric part with its
negative eigenvalues set to 0, eigen factors with eigenvalues clipped at the tail, a tridiagonal
cross block divided by its norm ``c`` when ``1 < c``. This module computes that form in float64 from
the raw safetensors bytes and the manifest as JSON, without ``laplace_hub``, and structurally (never
the dense Kronecker product), so that it reaches factors of side 1024 and more.

It also names the directions where a decode matters most: the outer products of the flattest
eigenvectors of each side's stored symmetric part.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

Tensors = Callable[[str], torch.Tensor]


@dataclass
class Reference:
    """The float64 penalty of updates of one module, and the scale its rounding is measured against."""

    penalty: Callable[[list[torch.Tensor]], float]
    lam_max: float  # an upper bound of λ_max(P): the spec's tolerance is relative to it
    flattest: list[list[torch.Tensor]]  # updates along the stored factors' flattest directions


def raw_tensors(folder: Path) -> Tensors:
    """Every stored tensor by key, as float64, read lazily from whichever file holds it."""
    where = {}
    for path in sorted(folder.glob("laplace*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            where.update(dict.fromkeys(f.keys(), path))
    return lambda key: _read(where[key], key)


def _read(path: Path, key: str) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key).to(torch.float64)


def psd_part(stored: torch.Tensor) -> torch.Tensor:
    """§8.3: the symmetric part with its negative eigenvalues set to 0."""
    values, vectors = torch.linalg.eigh((stored + stored.T) / 2)
    return (vectors * values.clamp_min(0)) @ vectors.T


def _unpacked(stored: torch.Tensor, n: int) -> torch.Tensor:
    rows, cols = torch.triu_indices(n, n)
    full = torch.zeros(n, n, dtype=torch.float64)
    full[rows, cols] = stored
    full[cols, rows] = stored
    return full


def stored_symmetric(ref: dict[str, Any], n: int, get: Tensors) -> torch.Tensor:
    """A dense factor's symmetric part as stored (before the PSD part is taken)."""
    stored = get(ref["key"])
    full = _unpacked(stored, n) if ref.get("packed") else stored
    return (full + full.T) / 2


def decoded_factor(ref: dict[str, Any], n: int, get: Tensors) -> torch.Tensor:
    if "eigenvalues" in ref:  # F = V diag(max(λ, t) − t) Vᵀ + t·I
        v, tail = get(ref["eigenvectors"]), float(ref["tail"])
        return (v * (get(ref["eigenvalues"]).clamp_min(tail) - tail)) @ v.T + tail * torch.eye(n, dtype=torch.float64)
    return psd_part(stored_symmetric(ref, n, get))


def _lam_max(matrix: torch.Tensor) -> float:
    return max(float(torch.linalg.eigvalsh(matrix)[-1]), 0.0)


def _kron_quad(out: torch.Tensor, inp: torch.Tensor) -> Callable[[torch.Tensor], float]:
    """``vec(Δ)ᵀ (out ⊗ inp) vec(Δ)`` for row-major vec, as ``Σ (out Δ inp) ∘ Δ``."""
    return lambda d: float(((out @ d @ inp) * d).sum())


def _inverse_cholesky(matrix: torch.Tensor) -> torch.Tensor | None:
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        return None
    return torch.linalg.solve_triangular(factor, torch.eye(len(matrix), dtype=torch.float64), upper=False)


def _cross_norm(
    a_out: torch.Tensor,
    a_in: torch.Tensor,
    b_out: torch.Tensor,
    b_in: torch.Tensor,
    right: torch.Tensor,
    left: torch.Tensor,
) -> float:
    """§8.2's ``c``: ``‖Aₒ^{-½} R Bₒ^{-½}‖₂ · ‖Aᵢ^{-½} L Bᵢ^{-½}‖₂`` on the decoded factors."""
    c = 1.0
    for first, second, cross in ((a_out, b_out, right), (a_in, b_in, left)):
        if not bool(cross.any()):
            return 0.0
        inv_first, inv_second = _inverse_cholesky(first), _inverse_cholesky(second)
        if inv_first is None or inv_second is None:
            return float("inf")
        c *= float(torch.linalg.matrix_norm(inv_first @ cross @ inv_second.T, ord=2))
    return c


def _block_reference(block: dict[str, Any], m: int, n: int, r: int, get: Tensors) -> tuple[Callable[..., float], float]:
    """(penalty of the block's param update(s), λ_max bound) for one stored block."""
    kind = block["structure"]
    if kind == "diag":
        diagonal = get(block["diagonal"]).reshape(m, n)
        return (lambda d: float((diagonal * d * d).sum())), float(diagonal.max().clamp_min(0))
    if kind == "diag_lowrank":
        diagonal, u = get(block["diagonal"]).reshape(m, n), get(block["lowrank"]).reshape(block["rank"], m, n)
        bound = float(diagonal.max().clamp_min(0)) + float(u.square().sum())
        return (lambda d: float((diagonal * d * d).sum() + ((u * d).sum((1, 2)) ** 2).sum())), bound
    if kind in ("kron", "kron_eig"):
        out, inp = decoded_factor(block["output"], m, get), decoded_factor(block["input"], n, get)
        return _kron_quad(out, inp), _lam_max(out) * _lam_max(inp)
    d_out, d_in = m, n  # kron_tridiag over (δA: r × d_in, δB: d_out × r)
    a_out, a_in = decoded_factor(block["a_output"], r, get), decoded_factor(block["a_input"], d_in, get)
    b_out, b_in = decoded_factor(block["b_output"], d_out, get), decoded_factor(block["b_input"], r, get)
    right, left = get(block["cross_output"]), get(block["cross_input"])  # R: r × d_out, L: d_in × r
    c = _cross_norm(a_out, a_in, b_out, b_in, right, left)
    right = right / c if 1.0 < c < float("inf") else right
    quad_a, quad_b = _kron_quad(a_out, a_in), _kron_quad(b_out, b_in)

    def penalty(da: torch.Tensor, db: torch.Tensor) -> float:
        return quad_a(da) + 2 * float((da * (right @ db @ left.T)).sum()) + quad_b(db)

    bound = 2 * (_lam_max(a_out) * _lam_max(a_in) + _lam_max(b_out) * _lam_max(b_in))
    return penalty, bound


def _flattest(block: dict[str, Any], m: int, n: int, get: Tensors, count: int = 2) -> list[torch.Tensor]:
    """Rank-one updates ``u vᵀ`` from the flattest eigenvectors of a Kronecker block's stored factors."""
    if block["structure"] != "kron":
        return []
    out = torch.linalg.eigh(stored_symmetric(block["output"], m, get)).eigenvectors[:, :count]
    inp = torch.linalg.eigh(stored_symmetric(block["input"], n, get)).eigenvectors[:, :count]
    return [torch.outer(out[:, i], inp[:, j]) for i in range(out.shape[1]) for j in range(inp.shape[1])]


def module_reference(folder: Path, name: str, get: Tensors | None = None) -> Reference:
    """The §5 penalty of module ``name`` over all its datasets (weighted), from the stored numbers."""
    manifest = json.loads((folder / "laplace.json").read_text())
    get = get or raw_tensors(folder)
    module = manifest["modules"][name]
    d_out, d_in = module["shape"]
    lora = manifest["parameterization"]["kind"] == "lora"
    r = manifest["parameterization"].get("rank", 0)
    sides = {"weight": (d_out, d_in), "lora_A": (r, d_in), "lora_B": (d_out, r), "lora_AB": (d_out, d_in)}
    weights = {d["name"]: d.get("weight", 1.0) for d in manifest["datasets"]}
    parts: list[tuple[str, float, Callable[..., float]]] = []
    lam_max = 0.0
    flattest: list[list[torch.Tensor]] = []
    for block in module["blocks"]:
        weight = weights.get(block.get("dataset"), 1.0)
        penalty, bound = _block_reference(block, *sides[block["param"]], r, get)
        parts.append((block["param"], weight, penalty))
        lam_max += weight * bound
        if not lora:
            flattest += [[d] for d in _flattest(block, d_out, d_in, get)]

    def total(deltas: list[torch.Tensor]) -> float:
        by_param = {"weight": deltas[:1], "lora_A": deltas[:1], "lora_B": deltas[1:], "lora_AB": deltas}
        return sum(w * p(*(d.double() for d in by_param[param])) for param, w, p in parts)

    return Reference(total, lam_max, flattest)
