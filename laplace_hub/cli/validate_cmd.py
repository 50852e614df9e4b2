"""``laplace-hub validate``: check an artifact folder against the spec, or one on a hub before pulling it."""

from __future__ import annotations

import argparse
from typing import Any

from laplace_hub.artifact.findings import Report
from laplace_hub.cli._common import add_command, add_max_bytes, print_json
from laplace_hub.progress import phase
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
        "  laplace-hub validate me/smollm2-laplace --remote          # manifest and headers only\n"
        "  laplace-hub validate HuggingFaceTB/SmolLM2-135M-Instruct@main --remote --subfolder laplace\n"
        "exit status: 0 valid, 1 invalid, 2 usage error",
    )
    parser.add_argument("path", help="the artifact folder, or owner/name[@revision] with --remote")
    parser.add_argument(
        "--remote",
        action="store_true",
        help="check an artifact on a hub without downloading it: manifest, index, headers, and checksums "
        "the hub lists (values are verified when you pull)",
    )
    parser.add_argument("--subfolder", default="", help="with --remote: the artifact's folder inside the repo")
    parser.add_argument("--hub", help="with --remote: a local folder hub or an http(s) endpoint (default: HF_ENDPOINT)")
    parser.add_argument("--token", help="with --remote: a Hugging Face token (default: HF_TOKEN); never printed")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-checksums", action="store_true", help="skip hashing the files")
    parser.add_argument("--no-values", action="store_true", help="skip loading tensors to check their values")
    parser.add_argument("--model", help="a base model folder (or Hub id) whose linear shapes must match")
    parser.add_argument("--gguf-file", help="GGUF file name inside --model")
    add_max_bytes(parser)
    parser.set_defaults(run=run, flags={"max_bytes": "--max-bytes", "subfolder": "--subfolder"})


def run(args: argparse.Namespace) -> int:
    """Validate and print; exit 1 when any finding is an error."""
    if args.remote:
        report = _remote(args)
    else:
        shapes = None
        if args.model:
            from laplace_hub.models import linear_shapes

            shapes = linear_shapes(args.model, gguf_file=args.gguf_file)
        checks = ", ".join(c for c, off in (("checksums", args.no_checksums), ("values", args.no_values)) if not off)
        with phase(f"validate {args.path}" + (f" ({checks})" if checks else "")):
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
            f"{report.path}: {'valid' if report.valid else 'INVALID'} "
            f"({errors} error(s), {len(report.findings) - errors} warning(s))"
        )
        if hasattr(report, "reach"):  # checked on a hub: say how far it could see
            print(report.reach())
    return 0 if report.valid else 1


def _remote(args: argparse.Namespace) -> Report:
    from laplace_hub.errors import LaplaceHubError
    from laplace_hub.hub import split_repo_revision, validate_remote

    if args.model or args.no_checksums or args.no_values:
        raise LaplaceHubError("--remote checks manifest and headers only: drop --model, --no-checksums, --no-values")
    repo_id, revision = split_repo_revision(args.path)
    return validate_remote(
        repo_id, revision=revision, subfolder=args.subfolder, hub=args.hub, token=args.token, max_bytes=args.max_bytes
    )
