"""``laplace-hub inspect``: a readable summary of an artifact."""

from __future__ import annotations

import argparse
from typing import Any

from laplace_hub.artifact import Artifact
from laplace_hub.cli._common import add_command, add_max_bytes, human_bytes, print_json


def register(sub: Any) -> None:
    """Add the command to the CLI."""
    parser = add_command(
        sub,
        "inspect",
        "Summarise an artifact: modules, structures, shapes, sizes, datasets, provenance.",
        "  laplace-hub inspect ./my-artifact\n  laplace-hub inspect ./my-artifact --json | jq .total_bytes",
    )
    parser.add_argument("path", help="the artifact folder")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_max_bytes(parser)
    parser.set_defaults(run=run, flags={"max_bytes": "--max-bytes"})


def summarize(artifact: Artifact) -> dict[str, Any]:
    """The facts ``inspect`` shows, as JSON data."""
    m = artifact.manifest
    sizes = artifact.nbytes_by_module()
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
        "total_bytes": sum(sizes.values()),
        "files": {name: entry.size for name, entry in m.files.items()},
        "software": m.software,
        "license": m.license,
        "lineage": [e.model_dump(mode="json") for e in m.lineage] if m.lineage else None,
    }


def run(args: argparse.Namespace) -> int:
    """Print the summary."""
    summary = summarize(Artifact.open(args.path, max_bytes=args.max_bytes))
    if args.json:
        print_json(summary)
        return 0
    est = summary["estimator"]
    print(f"artifact    {args.path} (spec {summary['spec_version']}, {summary['dtype']})")
    print(f"base model  {summary['base_model']['repo_id']} @ {summary['base_model']['revision'] or 'unpinned'}")
    print(
        f"param.      {summary['parameterization']['kind']}   estimator {est['kind']}"
        f"{'×' + str(est['mc_samples']) if est.get('mc_samples') else ''}   "
        f"normalisation {summary['normalization']}   K-FAC {summary['kfac_approx'] or '-'}"
    )
    print(f"datasets    ({summary['datasets_combined']})")
    for d in summary["datasets"]:
        counts = f"{d['sequences']:>8} seq {d['tokens']:>10} tok {d['batches']:>6} batches"
        print(f"  {d['name']:<20} {counts}  w={d['weight']}")
    width = max(len(n) for n in summary["modules"])
    print(f"modules     {len(summary['modules'])}")
    for name, info in summary["modules"].items():
        shape = "x".join(map(str, info["shape"]))
        print(f"  {name:<{width}}  {shape:>11}  {','.join(info['structures']):<24} {human_bytes(info['bytes']):>10}")
    for i, part in enumerate(summary["lineage"] or []):
        at = part["base_model"]["repo_id"] + (
            f"@{part['base_model']['revision']}" if part["base_model"]["revision"] else ""
        )
        print(
            f"{'lineage' if i == 0 else '':<11} {i}: γ={part['decay']:g} {', '.join(part['datasets'])} computed at {at}"
        )
    print(f"total       {human_bytes(summary['total_bytes'])} in {len(summary['files'])} file(s)")
    print("software    " + ", ".join(f"{k} {v}" for k, v in summary["software"].items()))
    return 0
