"""A target task the base model does badly: generated multi-step arithmetic word problems."""

from __future__ import annotations

import random
from dataclasses import dataclass

NAMES = ["Ada", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana"]
ITEMS = ["apples", "books", "coins", "stamps", "marbles", "pencils"]


@dataclass(frozen=True)
class Problem:
    """A question and its exact answer."""

    question: str
    answer: str


def _problem(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(2, 40), rng.randint(2, 30), rng.randint(2, 5)
    template = rng.randrange(3)
    if template == 0:
        return Problem(f"{name} has {a} {item} and buys {b} more. How many {item} now?", str(a + b))
    if template == 1:
        return Problem(
            f"{name} has {a + b} {item} and gives away {b}. Then gets {c} times as many. How many?", str(a * c)
        )
    return Problem(f"{name} buys {c} boxes of {a} {item} and loses {b}. How many {item} are left?", str(c * a - b))


def make_splits(n_train: int, n_val: int, n_test: int, seed: int = 0) -> dict[str, list[Problem]]:
    """Disjoint train/validation/test problems, reproducible from ``seed``."""
    rng = random.Random(seed)
    seen: set[str] = set()
    problems: list[Problem] = []
    while len(problems) < n_train + n_val + n_test:
        p = _problem(rng)
        if p.question not in seen:
            seen.add(p.question)
            problems.append(p)
    return {
        "train": problems[:n_train],
        "validation": problems[n_train : n_train + n_val],
        "test": problems[n_train + n_val :],
    }
