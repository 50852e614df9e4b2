"""Artifacts at realistic sizes (factor sides 512–1024), built at the edges of SPEC.md §8.2's rules.

The conformance vectors have sides of 4–24, where a 16-bit rounding or an antisymmetric part at
the symmetry margin cannot move a penalty far. These families write one module from scratch (the
manifest as JSON, the tensors with safetensors, nothing from ``laplace_hub``), each a value family
the issue names, with its parameters drawn by the case's :class:`~tests.fuzz.mutate.Chooser`:

* ``kron.psd_rounded`` — PSD factors (power-law, geometric to 1e-12, or rank-deficient spectra),
  rounded to the dtype, full or packed: valid by §8.2 (τ is at least twice the unit roundoff), so a
  refusal is a finding (``expect_valid``);
* ``kron.antisymmetric`` — a PSD symmetric part plus an antisymmetric part at a fraction of the
  symmetry margin (the issue's −4.92 penalty);
* ``kron.indefinite`` — the least eigenvalue pushed below 0 by a fraction of the PSD margin;
* ``kron_eig.edges`` — rank ``k`` from 1 to the side, the tail at or just above the smallest
  eigenvalue, eigenvectors perturbed up to and beyond the orthonormality tolerance;
* ``kron_tridiag.edges`` — LoRA pair blocks whose cross norm ``c`` sits below, at, just above and
  beyond 1;
* ``diag_lowrank.large`` — a 512 × 512 diagonal with low-rank directions.

The oracle then holds every accepted one to safety and to fidelity (``fidelity.py``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

MODULE = "model.layers.0.self_attn.q_proj"
SIDES = (512, 640, 768, 1024)
TAU = {"float64": 1e-10, "float32": 1e-6, "float16": 2e-3, "bfloat16": 1.6e-2}  # SPEC.md §8.2
ORTHO_TOL = {"float64": 1e-8, "float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
CROSS_TOL = {dtype: max(1e-3, tau) for dtype, tau in TAU.items()}
DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Builder:
    """One module's tensors and blocks, and the choices that made them (the case's label)."""

    def __init__(self, chooser: Any) -> None:
        self.ch = chooser
        self.gen = torch.Generator().manual_seed(chooser.seed())
        self.picks: list[str] = []
        self.tensors: dict[str, torch.Tensor] = {}
        self.expect_valid = False

    def pick(self, label: str, options: list[Any]) -> Any:
        value = self.ch.choice(options)
        self.picks.append(f"{label}={value}")
        return value

    def orthonormal(self, n: int, k: int) -> torch.Tensor:
        q, _ = torch.linalg.qr(torch.randn(n, k, generator=self.gen, dtype=torch.float64))
        return q

    def spectrum(self, n: int) -> torch.Tensor:
        """Eigenvalues (descending) of a PSD factor: the shapes curvature factors take."""
        kind = self.pick("spectrum", ["power1", "power2", "power4", "geometric", "rank_deficient"])
        i = torch.arange(1, n + 1, dtype=torch.float64)
        if kind.startswith("power"):
            return i ** -float(kind[-1])
        if kind == "geometric":
            return torch.logspace(0, -12, n, dtype=torch.float64)
        rank = self.pick("rank", sorted({1, min(8, n), max(1, n // 4)}))
        return torch.cat([torch.ones(rank, dtype=torch.float64), torch.zeros(n - rank, dtype=torch.float64)])

    def psd(self, n: int) -> torch.Tensor:
        q = self.orthonormal(n, n)
        return (q * self.spectrum(n)) @ q.T

    def put(self, key: str, value: torch.Tensor, dtype: str) -> str:
        self.tensors[key] = value.to(DTYPES[dtype]).contiguous()
        return key


def _factor_ref(b: Builder, key: str, factor: torch.Tensor, dtype: str, packed: bool) -> dict[str, Any]:
    if packed:
        rows, cols = torch.triu_indices(len(factor), len(factor))
        factor = factor[rows, cols]
    return {"key": b.put(key, factor, dtype), "packed": packed}


def _kron(b: Builder, dtype: str, shape: tuple[int, int], edit: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    packed = edit is _unchanged and b.pick("packed", [False, True])  # a packed factor is symmetric
    sides = {"output": shape[0], "input": shape[1]}
    block: dict[str, Any] = {"param": "weight", "dataset": None, "structure": "kron"}
    for role, n in sides.items():
        block[role] = _factor_ref(b, f"{MODULE}.weight.all.{role}", edit(b.psd(n)), dtype, packed)
    return block


def _unchanged(factor: torch.Tensor) -> torch.Tensor:
    return factor


def kron_psd_rounded(b: Builder, dtype: str, shape: tuple[int, int]) -> dict:
    b.expect_valid = True
    return _kron(b, dtype, shape, _unchanged)


def kron_antisymmetric(b: Builder, dtype: str, shape: tuple[int, int]) -> dict:
    fraction = b.pick("of_margin", [0.25, 0.5, 0.99, 2.0])

    def edit(factor: torch.Tensor) -> torch.Tensor:
        u = torch.randn(factor.shape, generator=b.gen, dtype=torch.float64)
        skew = u - u.T
        return factor + skew * (fraction * TAU[dtype] * float(factor.abs().max()) / float(skew.abs().max()) / 2)

    return _kron(b, dtype, shape, edit)


def kron_indefinite(b: Builder, dtype: str, shape: tuple[int, int]) -> dict:
    fraction = b.pick("of_margin", [0.25, 0.5, 2.0])

    def edit(factor: torch.Tensor) -> torch.Tensor:
        least = float(torch.linalg.eigvalsh(factor)[0])
        target = -fraction * TAU[dtype] / 2 * float(torch.linalg.matrix_norm(factor))
        return factor + (target - least) * torch.eye(len(factor), dtype=torch.float64)

    return _kron(b, dtype, shape, edit)


def kron_eig_edges(b: Builder, dtype: str, shape: tuple[int, int]) -> dict:
    block: dict[str, Any] = {"param": "weight", "dataset": None, "structure": "kron_eig"}
    wobble = b.pick("orthonormality", [0.0, 0.5, 2.0])
    b.expect_valid = wobble == 0.0
    for role, n in {"output": shape[0], "input": shape[1]}.items():
        k = b.pick(f"{role}_k", [1, 16, n])
        values = b.spectrum(n)[:k]
        least = float(values[-1].to(DTYPES[dtype]))  # as stored: a writer sets the tail from what it stores
        tail = {"zero": 0.0, "at_least": least, "above_least": least * (1 + TAU[dtype] / 2)}[
            b.pick(f"{role}_tail", ["zero", "at_least", "above_least"])
        ]
        vectors = b.orthonormal(n, k)
        vectors[:, 0] *= (1 + wobble * ORTHO_TOL[dtype]) ** 0.5  # max|VᵀV − I| = wobble × the tolerance
        key = f"{MODULE}.weight.all.{role}"
        block[role] = {
            "eigenvalues": b.put(f"{key}.eigenvalues", values, dtype),
            "eigenvectors": b.put(f"{key}.eigenvectors", vectors, dtype),
            "rank": k,
            "tail": tail,
        }
    return block


def _cross_norm(factors: dict[str, torch.Tensor], right: torch.Tensor, left: torch.Tensor) -> float:
    """§8.2's ``c`` of the stored factors (1 when rounding left one without a Cholesky factor)."""

    def side(first: torch.Tensor, second: torch.Tensor, cross: torch.Tensor) -> float:
        chol = [torch.linalg.cholesky_ex(f) for f in (first, second)]
        if any(int(info) for _, info in chol):
            return 1.0
        inv = [torch.linalg.inv(lower) for lower, _ in chol]
        return float(torch.linalg.matrix_norm(inv[0] @ cross @ inv[1].T, ord=2))

    return side(factors["a_output"], factors["b_output"], right) * side(factors["a_input"], factors["b_input"], left)


def kron_tridiag_edges(b: Builder, dtype: str, shape: tuple[int, int], rank: int) -> dict:
    d_out, d_in = shape
    sides = {"a_input": d_in, "a_output": rank, "b_input": rank, "b_output": d_out}
    stored = {}
    for role, n in sides.items():  # positive definite: c needs inverse square roots
        stored[role] = b.put(f"{MODULE}.lora_AB.all.{role}", b.psd(n) + 0.1 * torch.eye(n, dtype=torch.float64), dtype)
    decoded = {role: b.tensors[key].double() for role, key in stored.items()}
    right = torch.randn(rank, d_out, generator=b.gen, dtype=torch.float64)
    left = torch.randn(d_in, rank, generator=b.gen, dtype=torch.float64)
    target = {"half": 0.5, "one": 1.0, "just_above": 1 + CROSS_TOL[dtype] / 2, "beyond": 1 + 2 * CROSS_TOL[dtype]}[
        b.pick("c", ["half", "one", "just_above", "beyond"])
    ]
    right = right * (target / _cross_norm(decoded, right, left))  # c of the stored factors, before R's rounding
    block = {"param": "lora_AB", "dataset": None, "structure": "kron_tridiag"}
    block.update({role: {"key": key, "packed": False} for role, key in stored.items()})
    block["cross_output"] = b.put(f"{MODULE}.lora_AB.all.cross_output", right, dtype)
    block["cross_input"] = b.put(f"{MODULE}.lora_AB.all.cross_input", left, dtype)
    return block


def diag_lowrank_large(b: Builder, dtype: str, shape: tuple[int, int]) -> dict:
    rank = b.pick("rank", [1, 8])
    diagonal = torch.rand(shape, generator=b.gen, dtype=torch.float64) * b.pick("diag_scale", [0.0, 1e-8, 1.0])
    lowrank = torch.randn((rank, *shape), generator=b.gen, dtype=torch.float64) / shape[1]
    key = f"{MODULE}.weight.all"
    b.expect_valid = True
    return {
        "param": "weight",
        "dataset": None,
        "structure": "diag_lowrank",
        "diagonal": b.put(f"{key}.diagonal", diagonal, dtype),
        "lowrank": b.put(f"{key}.lowrank", lowrank, dtype),
        "rank": rank,
    }


WEIGHT_FAMILIES = {
    "kron.psd_rounded": kron_psd_rounded,
    "kron.antisymmetric": kron_antisymmetric,
    "kron.indefinite": kron_indefinite,
    "kron_eig.edges": kron_eig_edges,
    "diag_lowrank.large": diag_lowrank_large,
}
FAMILIES = (*WEIGHT_FAMILIES, "kron_tridiag.edges")


def write_large(folder: Path, chooser: Any) -> tuple[str, bool]:
    """Write one large artifact into ``folder``; returns its label and whether §8.2 says it is valid."""
    b = Builder(chooser)
    family = b.ch.choice(list(FAMILIES))
    dtype = b.pick("dtype", list(DTYPES))
    shape = (b.pick("d_out", list(SIDES)), b.pick("d_in", list(SIDES)))
    parameterization: dict[str, Any] = {"kind": "weight"}
    lora_init = None
    if family == "kron_tridiag.edges":
        rank = b.pick("r", [4, 16])
        block = kron_tridiag_edges(b, dtype, shape, rank)
        parameterization = {"kind": "lora", "rank": rank, "alpha": 2.0 * rank, "init_method": "gaussian"}
        lora_init = {
            "lora_A": b.put(f"{MODULE}.lora_A.init", torch.randn(rank, shape[1], generator=b.gen) / 32, "float32"),
            "lora_B": b.put(f"{MODULE}.lora_B.init", torch.zeros(shape[0], rank), "float32"),
        }
    else:
        block = WEIGHT_FAMILIES[family](b, dtype, shape)  # type: ignore[operator]
    folder.mkdir(parents=True)
    tensor_file = folder / "laplace.safetensors"
    save_file(b.tensors, str(tensor_file), metadata={"format": "laplace-hub/1.3"})
    data = tensor_file.read_bytes()
    manifest = {
        "format": "laplace-hub",
        "spec_version": "1.3",
        "base_model": {"repo_id": "fuzz/large", "revision": None, "fingerprint": None},
        "parameterization": parameterization,
        "estimator": {"kind": "empirical", "mc_samples": None, "seed": None},
        "loss": "cross_entropy",
        "normalization": "per_sequence",
        "kfac_approx": "expand",
        "datasets": [{"name": "source", "sequences": 64, "tokens": 4096, "batches": 8, "weight": 1.0}],
        "datasets_combined": "summed",
        "dtype": dtype,
        "modules": {MODULE: {"shape": list(shape), "blocks": [block], "lora_init": lora_init}},
        "files": {"laplace.safetensors": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}},
        "software": {},
        "license": None,
    }
    (folder / "laplace.json").write_text(json.dumps(manifest, indent=1))
    return f"{family}({', '.join(b.picks)})", b.expect_valid
