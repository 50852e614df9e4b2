"""What each way of decoding a stored dense factor costs, and how far it moves the penalty (SPEC.md §8.3).

    python benchmarks/bench_decode.py [--sizes 1024 4096 8192] [--repeats 3] [--json out.json]

A Kronecker factor of LLM shape: ``F = Q diag(λ) Qᵀ`` with ``λᵢ = i⁻²`` (a spectrum spanning
``1 … n⁻²``, as activation covariances do) and a random orthonormal ``Q``, stored in float32,
float16 and bfloat16. Rounding makes the stored numbers indefinite; three decodes make them PSD:

* ``ridge`` (spec 1.2): ``S + τ·‖S‖_F·I``;
* ``shift``: ``S + max(0, −λ_min(S))·I``, the least multiple of ``I`` (needs ``λ_min``: ``eigvalsh``);
* ``clip`` (spec 1.3): ``S₊``, ``S``'s negative eigenvalues set to 0 (``eigh``), skipped after a
  successful Cholesky.

For each, the time (median of repeats, float64, this machine's cores) and three errors: the
spectral change relative to ``‖S‖₂``; the median relative change of ``xᵀSx`` over random ``x``
(what a random update's penalty moves); and the worst relative change against the publisher's
exact factor over its 8 smallest eigen-directions (what the stored curvature says about the
flattest directions).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from laplace_hub.artifact.values import TOLERANCE

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """The median wall time of ``fn`` over ``repeats`` calls, and its last result."""
    runs, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs), out


def factor(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(F, Q, λ)``: a PSD factor with spectrum ``i⁻²`` in a random orthonormal basis."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    values = torch.arange(1, n + 1, dtype=torch.float64) ** -2.0
    return (q * values) @ q.T, q, values


def errors(
    decoded: torch.Tensor, sym: torch.Tensor, exact: torch.Tensor, bottom: torch.Tensor, x: torch.Tensor
) -> dict[str, float]:
    change = decoded - sym
    spectral = torch.linalg.matrix_norm(change, ord=2) / torch.linalg.matrix_norm(sym, ord=2)
    random = ((x * (x @ change)).sum(1).abs() / (x * (x @ sym)).sum(1).abs()).median()
    flat_exact = (bottom * (bottom @ exact)).sum(1)
    flat = ((bottom * (bottom @ decoded)).sum(1) - flat_exact).abs() / flat_exact
    return {"spectral": float(spectral), "random_rel": float(random), "flattest_rel": float(flat.max())}


def run(n: int, repeats: int) -> list[dict[str, Any]]:
    exact, q, _ = factor(n, seed=n)
    bottom = q[:, -8:].T.contiguous()
    x = torch.randn(64, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rows = []
    for name, dtype in DTYPES.items():
        stored = exact.to(dtype).double()
        sym = (stored + stored.T) / 2
        t_chol, (_, info) = timed(partial(torch.linalg.cholesky_ex, sym), repeats)
        t_eigh, (values, vectors) = timed(partial(torch.linalg.eigh, sym), repeats)
        t_eigvalsh, _ = timed(partial(torch.linalg.eigvalsh, sym), repeats)
        t_norm, fro = timed(partial(torch.linalg.matrix_norm, sym), repeats)
        eye = torch.eye(n, dtype=torch.float64)
        decodes = {
            "ridge": (t_norm, sym + TOLERANCE[name] * fro * eye),
            "shift": (t_eigvalsh, sym + max(0.0, -float(values[0])) * eye),
            "clip": (t_chol + (t_eigh if int(info) else 0.0), (vectors * values.clamp_min(0)) @ vectors.T),
        }
        for decode, (seconds, decoded) in decodes.items():
            rows.append(
                {
                    "n": n,
                    "dtype": name,
                    "decode": decode,
                    "seconds": round(seconds, 4),
                    "cholesky_s": round(t_chol, 4),
                    "eigh_s": round(t_eigh, 4),
                    "indefinite": bool(int(info)),
                    "lambda_min_rel": float(values[0] / values[-1]),
                    **errors(decoded, sym, exact, bottom, x),
                }
            )
            print(
                f"n={n:5d} {name:8s} {decode:5s} {seconds:8.3f}s  ‖ΔS‖₂/‖S‖₂={rows[-1]['spectral']:.2e}  "
                f"random Δ {rows[-1]['random_rel']:.2e}  flattest {rows[-1]['flattest_rel']:.2e}"
                f"  (Cholesky {t_chol:.3f}s, eigh {t_eigh:.3f}s, S indefinite: {rows[-1]['indefinite']})",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = [row for n in args.sizes for row in run(n, args.repeats)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
