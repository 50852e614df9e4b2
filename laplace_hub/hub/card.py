"""The model card pushed with an artifact: Hub metadata that links it to its base model, and how to use it.

The manifest's strings may be any text (control characters, line breaks, Markdown): the front
matter holds them exactly (:func:`~laplace_hub.text.front_matter`), the text shows them escaped.
"""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

from laplace_hub.artifact import Artifact
from laplace_hub.manifest import LoraParameterization
from laplace_hub.text import front_matter, markdown_code, markdown_text

# a repo id the Hub would accept, and so one worth a link
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?")


def card_metadata(artifact: Artifact) -> dict[str, Any]:
    """YAML metadata: ``library_name``, ``base_model`` (so the Hub links them), tags, a summary block."""
    m = artifact.manifest
    structures = sorted({b.structure for module in m.modules.values() for b in module.blocks})
    space = "lora-space" if isinstance(m.parameterization, LoraParameterization) else "weight-space"
    metadata: dict[str, Any] = {
        "library_name": "laplace-hub",
        "base_model": m.base_model.repo_id,
        "tags": ["laplace-hub", "laplace-approximation", "lalora", *structures, space],
        "laplace_hub": {
            "spec_version": m.spec_version,
            "structures": structures,
            "parameterization": m.parameterization.kind,
            "estimator": m.estimator.kind,
            "normalization": m.normalization,
            "modules": len(m.modules),
            "total_bytes": m.file_bytes(),
            "datasets": [{"name": d.name, "sequences": d.sequences, "tokens": d.tokens} for d in m.datasets],
        },
    }
    if m.lineage:
        metadata["laplace_hub"]["lineage_parts"] = len(m.lineage)
    if m.license:
        metadata["license"] = m.license
    return metadata


def _lineage_section(artifact: Artifact) -> str:
    lineage = artifact.manifest.lineage
    if not lineage:
        return ""
    rows = "\n".join(
        f"| {i} | {markdown_text(e.base_model.repo_id)}"
        f"{'@' + markdown_text(e.base_model.revision) if e.base_model.revision else ''} "
        f"| {', '.join(e.datasets)} | {e.decay:g} | {markdown_text(e.source)} |"
        for i, e in enumerate(lineage)
    )
    return f"""
## Lineage (a continual posterior)

Precisions of {len(lineage)} computed artifacts, oldest first, each multiplied by its decay; the mean
is the base model above (the weights after the latest task).

| part | computed at | datasets | decay | read from |
|---|---|---|---|---|
{rows}
"""


def build_card(artifact: Artifact, repo_id: str, subfolder: str = "") -> str:
    """The whole ``README.md``: YAML front matter and a human summary with the exact usage lines."""
    meta = card_metadata(artifact)
    info = meta["laplace_hub"]
    m = artifact.manifest
    datasets = "\n".join(
        f"| {d.name} | {d.sequences} | {d.tokens} | {d.batches} | {markdown_text(d.source)} |" for d in m.datasets
    )
    base = m.base_model.repo_id
    title = f"[{base}](https://huggingface.co/{base})" if _HUB_ID.fullmatch(base) else markdown_text(base)
    # string literals of Python and of the shell, exactly the repo and subfolder pushed to
    pull_args = json.dumps(repo_id) + (f", subfolder={json.dumps(subfolder)}" if subfolder else "")
    pull_command = f"laplace-hub pull {shlex.quote(repo_id)}" + (
        f" --subfolder {shlex.quote(subfolder)}" if subfolder else ""
    )
    return f"""---
{front_matter(meta).strip()}
---

# Laplace curvature for {title}

A laplace-hub curvature artifact (format spec {m.spec_version}): a
{info["parameterization"]}-space Laplace approximation ({", ".join(info["structures"])}) of the base
model's source loss over {info["modules"]} linear modules, {info["total_bytes"] / 2**20:.1f} MiB. Estimator
`{m.estimator.kind}`, normalisation `{m.normalization}` (the penalty strength λ counts source
{"sequences" if m.normalization == "per_sequence" else "tokens"}).

| dataset | sequences | tokens | batches | source |
|---|---|---|---|---|
{datasets}
{_lineage_section(artifact)}
## Use it to fine-tune with less forgetting (LaLoRA)

```python
from laplace_hub.consumers import LaplaceRegularizer

regularizer = LaplaceRegularizer.from_pretrained({pull_args}, model=peft_model, strength=100.0)
loss = task_loss + regularizer()
```

or {markdown_code(pull_command)}, then `laplace-hub inspect` / `laplace-hub validate` on the folder it prints.
"""
