"""Data-free curvature: surrogate source text sampled from the model itself (``--data self:N``).

The reviewers' main objection to LaLoRA is that publishers rarely have the pre-training data; the
model's own samples from generic prompts are a stand-in that needs none.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

PROMPTS = ("The", "In", "Once upon a time,", "def", "Question:", "A", "It is", "We", "import", "1.")


@torch.no_grad()
def sample_texts(
    model: Any, tokenizer: Any, count: int, *, max_new_tokens: int = 64, seed: int = 0, batch_size: int = 8
) -> list[str]:
    """``count`` texts sampled (temperature 1) from the model after rotating generic prompts."""
    torch.manual_seed(seed)
    texts: list[str] = []
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for start in tqdm(range(0, count, batch_size), desc="sampling self data", unit="batch", leave=False):
            prompts = [PROMPTS[(start + i) % len(PROMPTS)] for i in range(min(batch_size, count - start))]
            encoded = tokenizer(prompts, return_tensors="pt", padding=True).to(next(model.parameters()).device)
            output = model.generate(
                **encoded, do_sample=True, max_new_tokens=max_new_tokens, top_k=0, pad_token_id=tokenizer.pad_token_id
            )
            texts += tokenizer.batch_decode(output, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
    return texts
