"""Bootstrap confidence intervals over seeds and test examples, and paired differences between methods.

A sweep's mean over seeds varies with the seeds drawn and with the test examples drawn; with 3
seeds and 100–300 problems the second dominates for exact match. The two-level bootstrap resamples
both: seeds with replacement, then the examples with replacement (the same draw for every seed,
since every run is scored on the same examples), and pools each resampled run as its metric does
(``Σ values / Σ weights``). Every group is resampled with the *same* draws, so the difference
between two methods is paired: runs that share a seed share the LoRA init and the batches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from laplace_hub.evaluation.metrics import Scores

RESAMPLES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Draws:
    """One set of bootstrap draws: seed multiplicities and example multiplicities per resample."""

    seeds: tuple[int | None, ...]
    seed_counts: torch.Tensor  # [resamples, len(seeds)], each row sums to len(seeds)
    example_counts: torch.Tensor  # [resamples, examples], each row sums to examples

    @classmethod
    def make(cls, seeds: Sequence[int | None], examples: int, resamples: int = RESAMPLES, seed: int = 0) -> Draws:
        """Draws for runs of ``seeds`` on ``examples`` examples, from a fixed generator (reproducible)."""
        generator = torch.Generator().manual_seed(seed)
        k = len(seeds)
        picked_seeds = torch.randint(k, (resamples, k), generator=generator)
        picked_examples = torch.randint(examples, (resamples, examples), generator=generator)
        return cls(
            tuple(seeds),
            _counts(picked_seeds, k),
            _counts(picked_examples, examples),
        )

    def means(self, runs: Mapping[int | None, Scores]) -> torch.Tensor:
        """The resampled means over seeds of the pooled metric; ``runs`` maps each seed to its scores.

        A group with one run and no seed (the base model) is the same for every seed drawn.
        """
        order: list[int | None] = [None] * len(self.seeds) if set(runs) == {None} else list(self.seeds)
        values = torch.tensor([runs[s].values for s in order], dtype=torch.float64)
        weights = torch.tensor([runs[s].weights for s in order], dtype=torch.float64)
        per_seed = (values @ self.example_counts.T) / (weights @ self.example_counts.T)  # [seeds, resamples]
        return (self.seed_counts * per_seed.T).sum(1) / len(self.seeds)


def _counts(picks: torch.Tensor, size: int) -> torch.Tensor:
    counts = torch.zeros(picks.shape[0], size, dtype=torch.float64)
    return counts.scatter_add_(1, picks, torch.ones_like(picks, dtype=torch.float64))


def interval(samples: torch.Tensor, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval holding ``level`` of the bootstrap samples."""
    tail = (1 - level) / 2
    low, high = torch.quantile(samples, torch.tensor([tail, 1 - tail], dtype=samples.dtype)).tolist()
    return low, high


@dataclass(frozen=True)
class Difference:
    """A group's mean minus a reference group's, with its paired bootstrap interval."""

    difference: float
    low: float
    high: float
    significant: bool
    """The interval excludes zero."""


def difference(draws: Draws, runs: Mapping[int | None, Scores], reference: Mapping[int | None, Scores]) -> Difference:
    """``runs``' mean minus ``reference``'s, both resampled with the same draws (paired)."""
    mean = _pooled_mean(runs) - _pooled_mean(reference)
    low, high = interval(draws.means(runs) - draws.means(reference))
    return Difference(mean, low, high, low > 0 or high < 0)


def _pooled_mean(runs: Mapping[int | None, Scores]) -> float:
    return sum(s.mean for s in runs.values()) / len(runs)
