"""Target tasks as prompt/completion examples: generated (arithmetic, sorting), or the user's own file.

Also the skills that the forgetting probes measure and that no target task trains (copying a
list of words, naming its last word).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from laplace_hub.errors import DataError

NAMES = ["Ada", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana"]
ITEMS = ["apples", "books", "coins", "stamps", "marbles", "pencils"]


@dataclass(frozen=True)
class Example:
    """A prompt and the exact completion expected after it."""

    prompt: str
    completion: str


def _problem(rng: random.Random) -> Example:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(2, 40), rng.randint(2, 30), rng.randint(2, 5)
    template = rng.randrange(3)
    if template == 0:
        question, answer = f"{name} has {a} {item} and buys {b} more. How many {item} now?", a + b
    elif template == 1:
        question, answer = f"{name} has {a + b} {item}, gives away {b}, then gets {c} times as many. How many?", a * c
    else:
        question, answer = f"{name} buys {c} boxes of {a} {item} and loses {b}. How many {item} are left?", c * a - b
    return Example(f"Q: {question}\nA:", f" {answer}")


def _sorting(rng: random.Random) -> Example:
    numbers = rng.sample(range(1, 100), rng.choice((3, 4)))
    return Example(f"Q: Sort ascending: {' '.join(map(str, numbers))}\nA:", " " + " ".join(map(str, sorted(numbers))))


# name → one random example: arithmetic word problems (three multi-step templates), or sorting lists
TASKS: dict[str, Callable[[random.Random], Example]] = {"arithmetic": _problem, "sorting": _sorting}


WORDS = ["cat", "dog", "sun", "tree", "book", "milk", "road", "star", "fish", "rain", "lamp", "door", "hat", "cup"]


def _copy(rng: random.Random) -> Example:
    words = rng.sample(WORDS, rng.choice((3, 4)))
    return Example(f"Q: Copy: {' '.join(words)}\nA:", " " + " ".join(words))


def _last(rng: random.Random) -> Example:
    words = rng.sample(WORDS, 4)
    return Example(f"Q: Last word of: {' '.join(words)}\nA:", f" {words[-1]}")


# name → one random example of a skill that no target task trains (words only: no numbers, no sorting)
SKILLS: dict[str, Callable[[random.Random], Example]] = {"copy": _copy, "last": _last}


def _distinct(make: Callable[[random.Random], Example], count: int, rng: random.Random) -> list[Example]:
    seen: set[str] = set()
    examples: list[Example] = []
    while len(examples) < count:
        example = make(rng)
        if example.prompt not in seen:
            seen.add(example.prompt)
            examples.append(example)
    return examples


def task_splits(task: str, n_train: int, n_val: int, n_test: int, seed: int = 0) -> dict[str, list[Example]]:
    """Disjoint train/validation/test examples of a generated task (a name in :data:`TASKS`)."""
    examples = _distinct(TASKS[task], n_train + n_val + n_test, random.Random(seed))
    return {
        "train": examples[:n_train],
        "validation": examples[n_train : n_train + n_val],
        "test": examples[n_train + n_val :],
    }


def skill_examples(skill: str, count: int, seed: int = 0) -> list[Example]:
    """``count`` distinct questions of a skill (a name in :data:`SKILLS`).

    >>> [e.completion for e in skill_examples("last", 3)]
    [' cat', ' road', ' milk']
    """
    return _distinct(SKILLS[skill], count, random.Random(seed))


def read_examples(path: Path) -> list[Example]:
    """Examples from a ``.jsonl`` file of ``{"prompt": ..., "completion": ...}`` records."""
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            examples.append(Example(str(row["prompt"]), str(row["completion"])))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{path}:{number}: expected a JSON object with 'prompt' and 'completion'") from e
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples
