"""Bootstrap intervals and paired differences (laplace_hub.evaluation.stats) against brute force."""

from __future__ import annotations

import math
import random

import pytest
import torch

from laplace_hub.evaluation.choice import summarize
from laplace_hub.evaluation.metrics import Scores
from laplace_hub.evaluation.report import read_rows, table, write_rows
from laplace_hub.evaluation.stats import Draws, difference, interval


def _scores(rng: random.Random, n: int, p: float) -> Scores:
    """Exact-match-like scores (0/1) or, for p > 1, NLL-like sums over 1–9 tokens."""
    if p <= 1:
        return Scores(tuple(float(rng.random() < p) for _ in range(n)), (1.0,) * n)
    weights = tuple(float(rng.randint(1, 9)) for _ in range(n))
    return Scores(tuple(w * (p + rng.gauss(0, 0.3)) for w in weights), weights)


def test_resampled_means_equal_the_explicit_two_level_resampling() -> None:
    rng = random.Random(0)
    runs = {seed: _scores(rng, 7, 3.0) for seed in (0, 1, 2)}
    draws = Draws.make(tuple(runs), 7, resamples=50, seed=3)
    # the same draws, replayed by hand: seeds with replacement, then examples, pooled per run
    generator = torch.Generator().manual_seed(3)
    seeds = torch.randint(3, (50, 3), generator=generator)
    examples = torch.randint(7, (50, 7), generator=generator)
    for b in range(50):
        per_seed = []
        for s in seeds[b].tolist():
            picked = examples[b].tolist()
            values = [runs[s].values[i] for i in picked]
            weights = [runs[s].weights[i] for i in picked]
            per_seed.append(sum(values) / sum(weights))
        assert draws.means(runs)[b].item() == pytest.approx(sum(per_seed) / 3, rel=1e-12)


def test_one_run_of_exact_match_gives_the_binomial_interval() -> None:
    rng = random.Random(1)
    run = _scores(rng, 400, 0.3)
    p = run.mean
    draws = Draws.make((None,), 400, resamples=4000)
    low, high = interval(draws.means({None: run}))
    half = 1.96 * math.sqrt(p * (1 - p) / 400)
    assert low == pytest.approx(p - half, abs=0.01) and high == pytest.approx(p + half, abs=0.01)


def test_paired_differences_are_zero_for_equal_runs_and_significant_for_a_clear_shift() -> None:
    rng = random.Random(2)
    lora = {seed: _scores(rng, 60, 3.0) for seed in (0, 1, 2)}
    draws = Draws.make((0, 1, 2), 60)
    same = difference(draws, lora, lora)
    assert (same.difference, same.low, same.high, same.significant) == (0.0, 0.0, 0.0, False)
    shifted = {
        s: Scores(tuple(v + 0.2 * w for v, w in zip(r.values, r.weights, strict=True)), r.weights)
        for s, r in lora.items()
    }
    moved = difference(draws, shifted, lora)
    assert moved.difference == pytest.approx(0.2) and moved.significant and moved.low > 0
    # pairing matters: unrelated noise of the same size is not significant
    other = {seed: _scores(rng, 60, 3.0) for seed in (0, 1, 2)}
    assert not difference(draws, other, lora).significant


def test_summaries_from_a_runs_csv_carry_intervals_and_the_table_marks_significance(tmp_path) -> None:
    rng = random.Random(3)

    def row(method: str, strength: float, seed: int | None, em: float, nll: float) -> dict:
        target, source = _scores(rng, 100, em), _scores(rng, 16, nll)
        metrics = {f"{split}_target_em": target.mean for split in ("val", "test")}
        metrics |= {f"{split}_source_nll": source.mean for split in ("val", "test")}
        metrics |= {f"{split}_source_accuracy": 0.3 for split in ("val", "test")}
        examples = {"test_target_em_examples": target, "test_source_nll_examples": source}
        return {"method": method, "strength": strength, "seed": seed, "seconds": 1.0, **metrics, **examples}

    rows = [row("base", 0.0, None, 0.0, 3.5)]
    rows += [row("lora", 0.0, s, 0.1, 4.0) for s in (0, 1, 2)]
    rows += [row("kron", 10.0, s, 0.1, 3.5) for s in (0, 1, 2)]
    write_rows(rows, tmp_path / "runs.csv")
    summary = {s["method"]: s for s in summarize(read_rows(tmp_path / "runs.csv"))}
    kron = summary["kron"]
    low, high = kron["test_source_nll_ci"]
    assert low < kron["test_source_nll"] < high
    assert kron["test_source_nll_vs_lora"]["significant"] and kron["test_source_nll_vs_lora"]["high"] < 0
    assert not kron["test_target_em_vs_lora"]["significant"]  # same success rate
    assert summary["lora"]["test_source_nll_vs_base"]["significant"]
    assert "test_source_accuracy_ci" not in kron  # no per-example scores, no interval
    lines = table(list(summary.values())).splitlines()
    kron_line = next(line for line in lines if line.startswith("kron"))
    assert "]*" in kron_line and "± " in kron_line  # NLL significant; accuracy as mean ± sd
