"""``laplace-hub validate``: check an artifact folder against the spec."""

from __future__ import annotations

import argparse
from typing import Any

from laplace_hub.cli._common import add_command, add_max_bytes, print_json
from laplace_hub.validate import validate


def register(sub: Any) -> None:
    """Add the command to the CLI."""
    parser = add_command(
        sub,
        "validate",
        "Check that an artifact folder follows the spec; report every finding.",
        "  laplace-hub validate ./my-artifact\n"
        "  laplace-hub validate ./my-artifact --json\n"
        "  laplace-hub validate ./my-artifact --model ./SmolLM2-135M --gguf-file model.gguf\n"
        "exit status: 0 valid, 1 invalid, 2 usage error",
    )
    parser.add_argument("path", help="the artifact folder")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-checksums", action="store_true", help="skip hashing the files")
    parser.add_argument("--no-values", action="store_true", help="skip loading tensors to check their values")
    parser.add_argument("--model", help="a base model folder (or Hub id) whose linear shapes must match")
    parser.add_argument("--gguf-file", help="GGUF file name inside --model")
    add_max_bytes(parser)
    parser.set_defaults(run=run, flags={"max_bytes": "--max-bytes"})


def run(args: argparse.Namespace) -> int:
    """Validate and print; exit 1 when any finding is an error."""
    shapes = None
    if args.model:
        from laplace_hub.models import linear_shapes

        shapes = linear_shapes(args.model, gguf_file=args.gguf_file)
    report = validate(
        args.path,
        checksums=not args.no_checksums,
        values=not args.no_values,
        model_shapes=shapes,
        max_bytes=args.max_bytes,
    )
    if args.json:
        print_json(report.to_json())
    else:
        for finding in report.findings:
            print(finding.line())
        errors = len(report.errors)
        print(
            f"{args.path}: {'valid' if report.valid else 'INVALID'} "
            f"({errors} error(s), {len(report.findings) - errors} warning(s))"
        )
    return 0 if report.valid else 1
