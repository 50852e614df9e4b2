"""``laplace-hub inspect``: a readable summary of an artifact, or of the prior an adapter was trained under.

Every string from an artifact or an adapter folder is printed through :func:`~laplace_hub.text.shown`
(escaped when not printable: no terminal escape, no line break, no bidi override reaches the
terminal); ``--json`` prints them exactly, as JSON escapes.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from laplace_hub.artifact import Artifact
from laplace_hub.cli._common import add_command, add_max_bytes, human_bytes, print_json
from laplace_hub.consumers.provenance import ADAPTER_CONFIG, PROVENANCE_FILE, read_provenance
from laplace_hub.manifest import MANIFEST_NAME
from laplace_hub.models import parameter_count
from laplace_hub.text import shown


def register(sub: Any) -> None:
    """Add the command to the CLI."""
    parser = add_command(
        sub,
        "inspect",
        "Summarise an artifact: modules, structures, shapes, sizes, datasets, provenance.",
        "  laplace-hub inspect ./my-artifact\n"
        "  laplace-hub inspect ./my-artifact --json | jq .total_bytes\n"
        "  laplace-hub inspect ./my-artifact --model smollm2   # also: bytes vs the whole base model\n"
        "Sizes are compared with weights at bf16 (2 bytes a parameter): the covered modules' always,\n"
        "the whole base model's (parameters counted from its config, no weights loaded) with --model.\n"
        "  laplace-hub inspect ./my-adapter   # a PEFT adapter folder: the prior it was trained under",
    )
    parser.add_argument("path", help="the artifact folder, or a PEFT adapter folder (adapter_config.json)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--model", help="base model (folder, Hub id or 'smollm2') to compare the artifact's bytes with")
    parser.add_argument("--gguf-file", help="GGUF file name inside --model")
    add_max_bytes(parser)
    parser.set_defaults(run=run, flags={"max_bytes": "--max-bytes", "model": "--model"})


BF16_BYTES = 2  # the yardstick: a base model's weights as usually shipped


def summarize(artifact: Artifact, base_model_parameters: int | None = None) -> dict[str, Any]:
    """The facts ``inspect`` shows, as JSON data.

    ``base_model_parameters`` (the whole base model's count, when known) adds the artifact's size
    relative to that model at bf16; the size relative to the covered weights is always there.
    """
    m = artifact.manifest
    sizes = artifact.nbytes_by_module()
    tensors = sum(sizes.values())
    covered = BF16_BYTES * sum(module.shape[0] * module.shape[1] for module in m.modules.values())
    base = None if base_model_parameters is None else BF16_BYTES * base_model_parameters
    return {
        "spec_version": m.spec_version,
        "base_model": m.base_model.model_dump(mode="json"),
        "parameterization": m.parameterization.model_dump(mode="json"),
        "estimator": m.estimator.model_dump(mode="json"),
        "normalization": m.normalization,
        "kfac_approx": m.kfac_approx,
        "dtype": m.dtype,
        "datasets_combined": m.datasets_combined,
        "datasets": [d.model_dump(mode="json") for d in m.datasets],
        "modules": {
            name: {
                "shape": module.shape,
                "structures": sorted({f"{b.param}:{b.structure}" for b in module.blocks}),
                "bytes": sizes[name],
            }
            for name, module in m.modules.items()
        },
        "total_bytes": m.file_bytes(),  # as `find` and the model card count: what a pull downloads
        "tensor_bytes": tensors,
        "covered_weights_bf16_bytes": covered,
        "ratio_to_covered_weights_bf16": tensors / covered,
        "base_model_bf16_bytes": base,
        "ratio_to_base_model_bf16": None if base is None else tensors / base,
        "files": {name: entry.size for name, entry in m.files.items()},
        "software": m.software,
        "license": m.license,
        "lineage": [e.model_dump(mode="json") for e in m.lineage] if m.lineage else None,
    }


def run(args: argparse.Namespace) -> int:
    """Print the summary."""
    if is_adapter_folder(args.path):
        return run_adapter(args)
    artifact = Artifact.open(args.path, max_bytes=args.max_bytes)
    parameters = parameter_count(args.model, gguf_file=args.gguf_file) if args.model else None
    summary = summarize(artifact, parameters)
    if args.json:
        print_json(summary)
        return 0
    est = summary["estimator"]
    base = summary["base_model"]
    print(f"artifact    {shown(args.path)} (spec {summary['spec_version']}, {summary['dtype']})")
    print(f"base model  {shown(base['repo_id'])} @ {shown(base['revision']) if base['revision'] else 'unpinned'}")
    print(
        f"param.      {summary['parameterization']['kind']}   estimator {est['kind']}"
        f"{'×' + str(est['mc_samples']) if est.get('mc_samples') else ''}   "
        f"normalisation {summary['normalization']}   K-FAC {summary['kfac_approx'] or '-'}"
    )
    print(f"datasets    ({summary['datasets_combined']})")
    for d in summary["datasets"]:
        counts = f"{d['sequences']:>8} seq {d['tokens']:>10} tok {d['batches']:>6} batches"
        print(f"  {shown(d['name']):<20} {counts}  w={d['weight']}")
    names = {name: shown(name) for name in summary["modules"]}
    width = max(len(n) for n in names.values())
    print(f"modules     {len(summary['modules'])}")
    for name, info in summary["modules"].items():
        shape = "x".join(map(str, info["shape"]))
        print(
            f"  {names[name]:<{width}}  {shape:>11}  {','.join(info['structures']):<24} "
            f"{human_bytes(info['bytes']):>10}"
        )
    for i, part in enumerate(summary["lineage"] or []):
        at = shown(part["base_model"]["repo_id"]) + (
            f"@{shown(part['base_model']['revision'])}" if part["base_model"]["revision"] else ""
        )
        print(
            f"{'lineage' if i == 0 else '':<11} {i}: γ={part['decay']:g} {', '.join(part['datasets'])} computed at {at}"
        )
    print(f"total       {human_bytes(summary['total_bytes'])} in {len(summary['files'])} file(s)")
    print(
        f"size        {summary['ratio_to_covered_weights_bf16']:.3g}× the covered weights at bf16 "
        f"({human_bytes(summary['covered_weights_bf16_bytes'])})"
        + (
            f", {summary['ratio_to_base_model_bf16']:.3g}× the whole base model at bf16 "
            f"({human_bytes(summary['base_model_bf16_bytes'])}, {shown(args.model)})"
            if summary["base_model_bf16_bytes"] is not None
            else ""
        )
    )
    print("software    " + ", ".join(f"{shown(k)} {shown(v)}" for k, v in summary["software"].items()))
    return 0


# --- a PEFT adapter folder: the prior it was trained under ----------------------------------------


def is_adapter_folder(path: str) -> bool:
    """A PEFT adapter folder (``adapter_config.json``) that is not also an artifact (``laplace.json``)."""
    folder = Path(path)
    return os.path.lexists(folder / ADAPTER_CONFIG) and not os.path.lexists(folder / MANIFEST_NAME)


def adapter_summary(path: str) -> dict[str, Any]:
    """What ``inspect`` shows of an adapter folder, as JSON data (``provenance`` is ``None`` without a record)."""
    record = read_provenance(path)
    return {"adapter_folder": path, "provenance": None if record is None else record.model_dump(mode="json")}


def run_adapter(args: argparse.Namespace) -> int:
    """Print the provenance recorded beside an adapter (one-line error when it is unreadable)."""
    summary = adapter_summary(args.path)
    if args.json:
        print_json(summary)
        return 0
    record = summary["provenance"]
    print(f"adapter     {shown(args.path)}")
    if record is None:
        print(f"provenance  none recorded ({PROVENANCE_FILE} absent): not trained with a laplace-hub regularizer,")
        print("            or saved without its provenance")
        return 0
    print(f"trained     laplace-hub {shown(record['laplace_hub_version'])}, adapter {record['adapter']!r}")
    print(f"penalty     λ = {record['strength']:g}, mode {record['mode']}, {record['modules']} module(s)")
    artifact = record["artifact"]
    if artifact is None:
        prior = "isotropic L2 (P = I)" if record["prior"] == "identity" else "given in code (no artifact)"
        print(f"prior       {prior}")
        return 0
    if artifact["repo_id"]:
        where = shown(artifact["repo_id"]) + (
            f" @ {shown(artifact['revision'])}" if artifact["revision"] else " (revision unknown)"
        )
        where += f", subfolder {shown(artifact['subfolder'])}" if artifact["subfolder"] else ""
    elif artifact["path"] is not None:
        where = f"{shown(artifact['path'])} (a local folder, not pulled)"
    else:
        where = "an artifact held in memory"
    print(f"prior       {where}")
    print(f"manifest    sha256 {artifact['manifest_sha256'] or 'unknown'}")
    base = shown(artifact["base_model"]) + (
        f" @ {shown(artifact['base_model_revision'])}" if artifact["base_model_revision"] else ""
    )
    print(
        f"artifact    spec {artifact['spec_version']}, {', '.join(artifact['structures'])}, "
        f"{artifact['parameterization']}, normalisation {artifact['normalization']}, base model {base}"
    )
    return 0
