"""Forgetting beyond the curvature's corpus: nearby text, far text, the base model's behaviour, skills.

The held-out documents of the curvature corpus (``source_nll``) only show what the prior was
built to keep. These probes look further, each reported on its own:

* ``near_nll``: Python documentation the curvature never saw, the stdlib modules' own docstrings
  (prose paragraphs only, none sharing a paragraph or 8 words in a row with ``pydoc_data``);
* ``ood_nll``: English prose with no code, CPython's ``LICENSE.txt`` (history and licence terms);
* ``behaviour_nll``: the base model's own greedy answers to fixed chat prompts, scored as the
  tuned model's NLL per answer token (how much of the original behaviour is kept);
* ``skill_copy_em``, ``skill_last_em``: exact match on generated skills no target task trains
  (copy a list of words, name its last word), asked in turn after one worked example.

:func:`build_probes` tokenizes everything and generates the base answers once per sweep;
:func:`probe_metrics` scores a model with one forward pass per probe batch.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import random
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from laplace_hub.data import Batch, pad_batch, pydoc_texts
from laplace_hub.errors import DataError
from laplace_hub.evaluation.metrics import Scores, completion_scores, source_scores
from laplace_hub.evaluation.tasks import SKILLS, skill_examples

PROBE_METRICS = ("near_nll", "ood_nll", "behaviour_nll", *(f"skill_{s}_em" for s in SKILLS))
"""The probes' keys in every row: NLL per token (lower = less forgetting), exact match (higher)."""
PROBE_LABELS = {
    "near_nll": "near-domain NLL",
    "ood_nll": "out-of-domain NLL",
    "behaviour_nll": "behaviour NLL",
    **{f"skill_{s}_em": f"{s} skill EM" for s in SKILLS},
}
"""A short column or axis title per probe metric."""
# stdlib modules with prose-rich docstrings, all pure Python and present in every CPython build
NEAR_MODULES = (
    *("argparse", "bisect", "calendar", "collections", "contextlib", "csv", "dataclasses", "datetime"),
    *("decimal", "difflib", "email.message", "enum", "fractions", "functools", "gettext", "heapq"),
    *("http.client", "inspect", "ipaddress", "json", "logging", "mailbox", "optparse", "pathlib"),
    *("pickle", "queue", "random", "sched", "shutil", "statistics", "subprocess", "tarfile"),
    *("tempfile", "textwrap", "threading", "unittest", "urllib.parse", "warnings", "zipfile"),
)
# instruction-following requests with short everyday answers: no code, no arithmetic, no lists to sort
PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Write a haiku about the sea.",
    "Translate 'good morning' into Spanish.",
    "Explain what a rainbow is in one sentence.",
    "Suggest a name for a pet cat.",
    "Why is the sky blue?",
    "Write a short thank-you note to a friend.",
    "What is the opposite of 'cold'?",
    "Describe a good breakfast.",
    "Name four colours.",
    "What should I do if I cannot sleep?",
    "Give me a synonym for 'happy'.",
    "Tell me a fun fact about elephants.",
    "How do I make a cup of tea?",
    "Write one sentence about autumn.",
)
_CODE = re.compile(r"^\s*(>>>|\.\.\.)|[{}\[\]=<>_`\\|#]|\S {3,}\S", re.M)


@dataclass(frozen=True)
class ProbeSizes:
    """How much each probe reads: little, since every model of a sweep is scored on all of them.

    Every model sees the same texts and questions, so each probe compares models on paired data
    and small sets suffice. On SmolLM2's tokenizer these sizes make about 1 600 token positions
    of forward passes per model; the base answers are ``behaviour_prompts`` × ≤ ``answer_tokens``
    generated tokens, once per sweep.
    """

    texts: int = 4
    max_length: int = 64
    behaviour_prompts: int = 8
    answer_tokens: int = 32
    skill_questions: int = 16
    batch_size: int = 8


@dataclass(frozen=True)
class Probes:
    """Tokenized probe batches and the base model's greedy answers (token ids), built once."""

    near: list[Batch]
    ood: list[Batch]
    behaviour: list[Batch]
    skills: dict[str, list[Batch]]
    prompts: list[list[int]]
    answers: list[list[int]]


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, whitespace collapsed."""
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def shingles(text: str, n: int = 8) -> set[tuple[str, ...]]:
    """Every run of ``n`` consecutive lower-cased words."""
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def disjoint(texts: Iterable[str], reference: Iterable[str]) -> list[str]:
    """``texts`` less any equal to a paragraph of ``reference`` or sharing 8 words in a row with it.

    >>> disjoint(["one two three four five six seven eight", "a b"], ["zero one two three four five six seven eight"])
    ['a b']
    """
    seen, grams = _index(tuple(reference))
    return [t for t in texts if t not in seen and not shingles(t) & grams]


@functools.lru_cache(maxsize=2)
def _index(reference: tuple[str, ...]) -> tuple[frozenset[str], frozenset[tuple[str, ...]]]:
    """The paragraphs and 8-word runs of ``reference`` (``pydoc_data``'s, kept for the next sweep)."""
    paras = frozenset(p for text in reference for p in paragraphs(text))
    return paras, frozenset(g for text in reference for g in shingles(text))


def _prose(paragraph: str) -> bool:
    """A paragraph of running text: no code, table or list markup, at least 20 words, a full stop."""
    if _CODE.search(paragraph) or any(line[:1] in (" ", "\t", "-", "*") for line in paragraph.splitlines()):
        return False
    letters = sum(c.isalpha() or c.isspace() for c in paragraph)
    return len(paragraph.split()) >= 20 and letters >= 0.9 * len(paragraph) and paragraph.rstrip().endswith(".")


def _prose_paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if _prose(p.strip("\n"))]


def _own_docstrings(name: str) -> list[str]:
    """The module's docstring, then those of its public classes, their methods, and its functions."""
    module = importlib.import_module(name)
    docs = [module.__doc__]
    for key, value in sorted(vars(module).items()):
        if key.startswith("_") or getattr(value, "__module__", None) != name:
            continue
        if inspect.isfunction(value) or inspect.isclass(value):
            docs.append(value.__doc__)
        if inspect.isclass(value):
            docs += [
                f.__doc__ for k, f in sorted(vars(value).items()) if not k.startswith("_") and inspect.isfunction(f)
            ]
    return [inspect.cleandoc(d) for d in docs if isinstance(d, str)]


def near_domain_texts() -> list[str]:
    """Prose paragraphs of the :data:`NEAR_MODULES` docstrings that ``pydoc_data`` does not contain."""
    found = [p for name in NEAR_MODULES for doc in _own_docstrings(name) for p in _prose_paragraphs(doc)]
    return disjoint(dict.fromkeys(found), pydoc_texts())


def python_license() -> Path:
    """CPython's ``LICENSE.txt``, where the ``license()`` builtin looks for it.

    Raises:
        DataError: This Python ships no licence file (the out-of-domain probe's source).

    """
    stdlib = Path(os.__file__).parent
    places = [
        folder / name
        for folder in (stdlib, stdlib.parent, Path(sys.base_prefix))
        for name in ("LICENSE.txt", "LICENSE")
    ]
    for path in places:
        if path.is_file():
            return path
    raise DataError(
        f"the out-of-domain probe reads CPython's LICENSE.txt, which this Python lacks (looked in "
        f"{', '.join(map(str, places))}); turn the probes off (probes=False, --no-probes)"
    )


def out_of_domain_texts() -> list[str]:
    """Prose paragraphs of CPython's licence file (its history and licence terms), none in ``pydoc_data``."""
    return disjoint(dict.fromkeys(_prose_paragraphs(python_license().read_text(encoding="utf-8"))), pydoc_texts())


def _text_batches(texts: Sequence[str], tokenizer: Any, sizes: ProbeSizes, seed: int) -> list[Batch]:
    order = random.Random(seed).sample(range(len(texts)), len(texts))
    sequences = [ids for i in order if len(ids := tokenizer(texts[i])["input_ids"][: sizes.max_length]) >= 2]
    sequences = sequences[: sizes.texts]
    if not sequences:
        raise DataError("a probe's source has no text of two tokens or more")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return [pad_batch(sequences[i : i + sizes.batch_size], pad) for i in range(0, len(sequences), sizes.batch_size)]


def skill_batch(skill: str, tokenizer: Any, questions: int, seed: int = 0) -> Batch:
    """One sequence: a worked example, then ``questions`` questions answered in turn; the answers carry the labels.

    Question k thus follows k worked examples (teacher forcing puts the true answers before it),
    and costs only its own tokens rather than a prompt of its own.
    """
    shot, *asked = skill_examples(skill, questions + 1, seed)
    ids = _encode(tokenizer, shot.prompt + shot.completion, first=True)
    labels = [-100] * len(ids)
    for example in asked:
        prompt, answer = _encode(tokenizer, "\n\n" + example.prompt), _encode(tokenizer, example.completion)
        ids += prompt + answer
        labels += [-100] * len(prompt) + answer
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "labels": torch.tensor([labels]),
    }


def _encode(tokenizer: Any, text: str, first: bool = False) -> list[int]:
    """Token ids of ``text``; past the first piece of a sequence without the tokenizer's BOS, where it adds one."""
    continuation = not first and "add_special_tokens" in inspect.signature(tokenizer).parameters
    return list(tokenizer(text, **({"add_special_tokens": False} if continuation else {}))["input_ids"])


def chat_prompt(tokenizer: Any, request: str) -> list[int]:
    """A user turn in the tokenizer's chat template, ready for the answer; ``Question/Answer`` without one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": request}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(f"Question: {request}\nAnswer:")["input_ids"])


@torch.no_grad()
def greedy_answers(
    model: Any, prompts: Sequence[list[int]], pad_id: int, stop: Sequence[int], sizes: ProbeSizes
) -> list[list[int]]:
    """Greedy continuations of at most ``sizes.answer_tokens`` tokens, each up to its first stop token."""
    device, answers = next(model.parameters()).device, []
    for i in range(0, len(prompts), sizes.batch_size):
        chunk = prompts[i : i + sizes.batch_size]
        width = max(map(len, chunk))  # left-padded, so that every answer starts at the same column
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=sizes.answer_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=list(stop) or None,
        )
        for row in out[:, width:].tolist():
            end = next((k + 1 for k, token in enumerate(row) if token in stop), len(row))
            answers.append(row[:end])
    return answers


def behaviour_batches(
    prompts: Sequence[list[int]], answers: Sequence[list[int]], pad_id: int, batch_size: int
) -> list[Batch]:
    """Prompt + answer sequences whose labels are the answer tokens only."""
    sequences = [p + a for p, a in zip(prompts, answers, strict=True)]
    return [
        pad_batch(sequences[i : i + batch_size], pad_id, [len(p) for p in prompts[i : i + batch_size]])
        for i in range(0, len(sequences), batch_size)
    ]


def build_probes(
    model: Any, tokenizer: Any, sizes: ProbeSizes | None = None, *, exclude: Sequence[str] = (), seed: int = 0
) -> Probes:
    """Every probe's batches, with the base ``model``'s answers generated here, once.

    Args:
        model: The base model, before any fine-tuning.
        tokenizer: Its tokenizer (its chat template renders the behaviour prompts when it has one).
        sizes: How much each probe reads.
        exclude: The curvature's texts: near and out-of-domain paragraphs overlapping them are
            dropped too (``pydoc_data``'s always are).
        seed: Which paragraphs and skill questions are drawn.

    Raises:
        DataError: The out-of-domain source is missing, or a source has no usable text left.

    """
    sizes = sizes or ProbeSizes()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    near, ood = near_domain_texts(), out_of_domain_texts()
    if exclude:
        near, ood = disjoint(near, exclude), disjoint(ood, exclude)
    prompts = [chat_prompt(tokenizer, p) for p in PROMPTS[: sizes.behaviour_prompts]]
    stop = [t for t in dict.fromkeys([tokenizer.eos_token_id, *_config_eos(model)]) if t is not None]
    answers = greedy_answers(model, prompts, pad, stop, sizes)
    skills = {name: [skill_batch(name, tokenizer, sizes.skill_questions, seed)] for name in SKILLS}
    return Probes(
        near=_text_batches(near, tokenizer, sizes, seed),
        ood=_text_batches(ood, tokenizer, sizes, seed),
        behaviour=behaviour_batches(prompts, answers, pad, sizes.batch_size),
        skills=skills,
        prompts=prompts,
        answers=answers,
    )


def _config_eos(model: Any) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def probe_metrics(model: Any, probes: Probes) -> dict[str, float]:
    """Every probe's score for ``model``, keyed as :data:`PROBE_METRICS`; each batch goes through once."""
    return {name: scores.mean for name, scores in probe_scores(model, probes).items()}


def probe_scores(model: Any, probes: Probes) -> dict[str, Scores]:
    """:func:`probe_metrics` per example (paragraph, answer or question), for confidence intervals."""
    out = {
        "near_nll": source_scores(model, probes.near)["source_nll"],
        "ood_nll": source_scores(model, probes.ood)["source_nll"],
        "behaviour_nll": source_scores(model, probes.behaviour)["source_nll"],
    }
    for name, batches in probes.skills.items():
        out[f"skill_{name}_em"] = completion_scores(model, batches)
    return out
