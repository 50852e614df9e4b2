"""Source and target text: named datasets, read from where they live and tokenized into labelled batches.

A dataset's source is a file (``.txt``, ``.jsonl``, ``.parquet``), a saved ``datasets`` folder,
``stdlib:pydoc`` (the Python reference shipped with the stdlib: real English text without a
download), or ``self:N`` (N texts sampled from the model itself, for publishers who lack the
pre-training data).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from laplace_hub.errors import DataError
from laplace_hub.manifest import DATASET_NAME_PATTERN, MAX_DATASET_NAME_LENGTH
from laplace_hub.progress import progress

Batch = dict[str, Tensor]
PYDOC = "stdlib:pydoc"
SELF = "self:"
# rotated over the samples of ``self:N``: generic openings of prose, code, Q&A and lists
PROMPTS = ("The", "In", "Once upon a time,", "def", "Question:", "A", "It is", "We", "import", "1.")


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset: ``name=path`` on the command line (the name defaults to the file stem)."""

    name: str
    path: Path

    @classmethod
    def parse(cls, text: str) -> DatasetSpec:
        """Parse ``name=path`` or ``path``; the default name is the stem, made a valid dataset name.

        >>> DatasetSpec.parse("stdlib:pydoc").name, DatasetSpec.parse("my data.v2.txt").name
        ('stdlib_pydoc', 'my_data_v2')
        """
        name, _, path = text.rpartition("=")
        path_obj = Path(path)
        default = re.sub(r"[^A-Za-z0-9_-]", "_", path_obj.stem).lstrip("-")[:MAX_DATASET_NAME_LENGTH]
        return cls(name or default or "data", path_obj)

    @property
    def location(self) -> str:
        """Where an error about this dataset points: the ``source`` parameter and its value."""
        return f"source {f'{self.name}={self.path}'!r}"


def check_source(spec: DatasetSpec) -> None:
    """Refuse a missing file or a malformed ``self:N`` cheaply, before minutes go into loading a model.

    >>> check_source(DatasetSpec.parse("docs=stdlib:pydoc"))
    >>> check_source(DatasetSpec.parse("me=self:x"))
    Traceback (most recent call last):
    laplace_hub.errors.DataError: source 'me=self:x': expected self:N with N a whole number

    Raises:
        DataError: The name is not a dataset name (SPEC.md §4), the file or folder does not exist,
            or ``N`` of ``self:N`` is not a whole number.

    """
    if not re.fullmatch(DATASET_NAME_PATTERN, spec.name):
        raise DataError(
            f"dataset name {spec.name!r} must be 1-{MAX_DATASET_NAME_LENGTH} letters, digits, _ or - "
            "(not starting with -); write NAME=PATH",
            location=spec.location,
        )
    source = str(spec.path)
    if source == PYDOC:
        return
    if source.startswith(SELF):
        if not source.removeprefix(SELF).isdigit():
            raise DataError("expected self:N with N a whole number", location=spec.location)
        return
    if not spec.path.exists():
        raise DataError(f"no such file or folder: {spec.path}", location=spec.location)


def load_texts(spec: DatasetSpec, model: Any, tokenizer: Any, *, max_length: int = 128, seed: int = 0) -> list[str]:
    """A dataset's documents, from a file or folder, ``stdlib:pydoc`` or ``self:N``.

    Args:
        spec: The named source.
        model: The model ``self:N`` samples from (unused by the other sources).
        tokenizer: Renders chat ``messages`` records and decodes ``self:N`` samples.
        max_length: Tokens sampled per ``self:N`` text.
        seed: Seed of the ``self:N`` samples.

    Raises:
        DataError: As :func:`check_source`, or the file cannot be read as documents.

    """
    check_source(spec)
    source = str(spec.path)
    if source == PYDOC:
        return pydoc_texts()
    if source.startswith(SELF):
        count = int(source.removeprefix(SELF))
        return sample_texts(model, tokenizer, count, max_new_tokens=max_length, seed=seed)
    return read_texts(spec.path, tokenizer=tokenizer)


def read_texts(path: Path, *, text_field: str = "text", tokenizer: Any = None) -> list[str]:
    """Documents of a ``.txt``, ``.jsonl``, ``.parquet`` file or a saved ``datasets`` folder.

    ``.txt`` documents are separated by blank lines; records carry ``text_field``, or chat
    ``messages`` rendered with the tokenizer's chat template.
    """
    if not path.exists():
        raise DataError(f"no such file or folder: {path}")
    if path.is_dir():
        try:
            from datasets import load_from_disk
        except ImportError as e:
            raise DataError(f"{path} is a folder; reading a saved dataset needs `pip install datasets`") from e
        return [_render(row, text_field, tokenizer, path) for row in load_from_disk(str(path))]
    if path.suffix == ".txt":
        return [doc.strip() for doc in path.read_text(encoding="utf-8").split("\n\n") if doc.strip()]
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{number}: not JSON ({e.msg})") from e
        return [_render(row, text_field, tokenizer, path) for row in rows]
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise DataError(f"{path}: reading parquet needs `pip install pyarrow`") from e
        return [_render(row, text_field, tokenizer, path) for row in pq.read_table(path).to_pylist()]
    raise DataError(f"{path}: unsupported file type {path.suffix!r} (use .txt, .jsonl, .parquet or a dataset folder)")


def _render(row: Any, text_field: str, tokenizer: Any, path: Path) -> str:
    if isinstance(row, dict) and isinstance(row.get(text_field), str):
        return row[text_field]
    if isinstance(row, dict) and isinstance(row.get("messages"), list) and tokenizer is not None:
        return str(tokenizer.apply_chat_template(row["messages"], tokenize=False))
    raise DataError(f"{path}: a record has neither a {text_field!r} string nor chat 'messages'")


def make_batches(
    texts: Sequence[str],
    tokenizer: Any,
    *,
    max_length: int,
    batch_size: int,
    num_batches: int | None = None,
    seed: int = 0,
) -> list[Batch]:
    """Shuffle, tokenize (truncating to ``max_length``), and pad into labelled batches.

    Labels are the input ids with -100 at padding, so padding never counts as data.
    """
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sequences: list[list[int]] = []
    wanted = None if num_batches is None else num_batches * batch_size
    for i in order:
        ids = tokenizer(texts[i], truncation=True, max_length=max_length)["input_ids"]
        if len(ids) >= 2:
            sequences.append(ids)
        if wanted is not None and len(sequences) == wanted:
            break
    if not sequences:
        raise DataError("no text with at least two tokens")
    return [pad_batch(sequences[i : i + batch_size], pad) for i in range(0, len(sequences), batch_size)]


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, prompt_lengths: Sequence[int] | None = None) -> Batch:
    """Right-pad token lists; labels are -100 on padding and on the first ``prompt_lengths`` tokens."""
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), length), dtype=torch.long)
    labels = torch.full((len(sequences), length), -100, dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        labels[row, : len(ids)] = torch.tensor(ids)
        if prompt_lengths is not None:
            labels[row, : prompt_lengths[row]] = -100
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def pydoc_texts() -> list[str]:
    """Real English text without downloads: the Python reference topics shipped with the stdlib."""
    from pydoc_data.topics import topics

    return [topics[key].strip() for key in sorted(topics) if topics[key].strip()]


@torch.no_grad()
def sample_texts(
    model: Any, tokenizer: Any, count: int, *, max_new_tokens: int = 64, seed: int = 0, batch_size: int = 8
) -> list[str]:
    """``count`` texts sampled (temperature 1) from the model after rotating generic prompts.

    The reviewers' main objection to LaLoRA is that publishers rarely have the pre-training data;
    the model's own samples are a stand-in that needs none.
    """
    torch.manual_seed(seed)
    texts: list[str] = []
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for start in progress(range(0, count, batch_size), desc="sampling self data", unit="batch", leave=False):
            prompts = [PROMPTS[(start + i) % len(PROMPTS)] for i in range(min(batch_size, count - start))]
            encoded = tokenizer(prompts, return_tensors="pt", padding=True).to(next(model.parameters()).device)
            output = model.generate(
                **encoded, do_sample=True, max_new_tokens=max_new_tokens, top_k=0, pad_token_id=tokenizer.pad_token_id
            )
            texts += tokenizer.batch_decode(output, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
    return texts
