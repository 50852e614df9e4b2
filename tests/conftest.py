"""Shared fixtures: every cache goes to a temp dir, nothing phones the real Hub."""

from __future__ import annotations

import os

# Nothing in a test process may reach the real Hub: a dead local endpoint unless a test names one.
os.environ.setdefault("HF_ENDPOINT", "http://127.0.0.1:9")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One torch thread per test process (and its subprocesses) on the 2-core machines: two OpenMP
# threads wait on each other whenever one is descheduled (scripts/test.sh sets the same).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFORMANCE_ROOT = ROOT / "spec" / "conformance"
CONFORMANCE = CONFORMANCE_ROOT / "1.0"  # the golden vectors of the first minor: every later reader reads them
CONFORMANCE_1_1 = CONFORMANCE_ROOT / "1.1"
# Vectors written for a 1.1 reader with "1.2" as the future minor. A 1.2 reader sees a manifest of
# its own minor: the unknown field is an error, not a warning (§10), and the unknown structure is
# not "a newer minor's" but simply not in the schema. They stay as the record of what a 1.1 reader
# must do; this reader gives the verdict below instead (1.2/*/…-1.3 replace them for 1.2 readers).
SUPERSEDED = {
    "1.1/valid/newer-minor-1.2": "manifest.unknown_field",
    "1.1/invalid/unknown-structure-newer-minor": "manifest.schema",
    "1.2/valid/newer-minor-1.3": "manifest.unknown_field",
    "1.2/invalid/unknown-structure-newer-minor-1.3": "manifest.schema",
}


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "1"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The real ``laplace-hub`` command in a child process."""
    return subprocess.run([sys.executable, "-m", "laplace_hub.cli", *args], capture_output=True, text=True, timeout=600)


def tiny_model_folder(
    folder: Path, lengths: Sequence[int], text: str = "source.txt", seed: int = 0, model: torch.nn.Module | None = None
) -> Path:
    """A tiny Llama (or ``model``) and a word-level tokenizer (``t2``…``t22``) saved as a model folder, for
    the real CLI, with random documents of ``lengths`` words in ``folder / text``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (model or tiny_llama()).float().save_pretrained(folder)
    vocab = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, 23)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>").save_pretrained(folder)
    gen = torch.Generator().manual_seed(seed)
    docs = [" ".join(f"t{int(i)}" for i in torch.randint(2, 23, (n,), generator=gen)) for n in lengths]
    (folder / text).write_text("\n\n".join(docs))
    return folder


def tiny_llama() -> torch.nn.Module:
    """A 2-layer Llama (hidden 8, GQA) in float64, the same every call."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=23,
        hidden_size=8,
        intermediate_size=12,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).double().eval()


class Words:
    """A whitespace tokenizer over the tiny model's vocabulary."""

    pad_token_id, eos_token_id = 0, 1

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [2 + (sum(map(ord, w)) % 21) for w in text.split()]}


def lively_llama() -> torch.nn.Module:
    """A tiny Llama whose greedy answers depend on the prompt and that LoRA can teach in a few steps.

    :func:`tiny_llama`'s logits are nearly uniform: its loss stays at ln 21 whatever LoRA learns.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=23,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        initializer_range=0.3,
    )
    return LlamaForCausalLM(config).double().eval()


def save_tiny_artifact(base: torch.nn.Module, folder: Path, targets: Sequence[str] = ("q_proj", "v_proj")) -> Path:
    """K-FAC of ``base`` on three short random sequences, saved at ``folder`` (for provenance and card tests)."""
    from laplace_hub.data import pad_batch
    from laplace_hub.manifest import BaseModelInfo
    from laplace_hub.models import select_targets
    from laplace_hub.producers import ComputeOptions, compute_artifact

    gen = torch.Generator().manual_seed(1)
    batches = [pad_batch([torch.randint(2, 23, (6,), generator=gen).tolist() for _ in range(3)], 0)]
    artifact = compute_artifact(
        base, {"src": batches}, select_targets(base, list(targets)), ComputeOptions(), BaseModelInfo(repo_id="me/tiny")
    )
    artifact.save(folder)
    return folder
