"""``laplace-hub sweep``: learning vs forgetting over methods, λ and seeds on your own model and data."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from laplace_hub.cli._common import add_command, print_json
from laplace_hub.errors import LaplaceHubError

T = TypeVar("T")


def parse_list(text: str, kind: Callable[[str], T], flag: str) -> tuple[T, ...]:
    """``"1,2,3"`` → ``(1, 2, 3)`` with an error naming the flag."""
    try:
        return tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise LaplaceHubError(f"{flag}: cannot read {text!r} as a comma-separated list") from None


def register(sub: Any) -> None:
    """Add the command to the CLI."""
    p = add_command(
        sub,
        "sweep",
        "Fine-tune with each method, λ and seed; measure learning and forgetting; choose λ on validation data.",
        "  laplace-hub sweep smollm2 --source pydoc=stdlib:pydoc --target arithmetic --out sweep/\n"
        "  laplace-hub sweep ./my-model --source wiki=wiki.txt --target-train t.jsonl --target-val v.jsonl \\\n"
        "      --target-test s.jsonl --methods lora,l2,diag,kron --strengths 1,10,100 --seeds 0,1,2 \\\n"
        "      --artifact kron=./pulled-artifact --priority learning --budget 0.02 --out sweep/ --json\n"
        "  laplace-hub sweep smollm2 --source pydoc=stdlib:pydoc --target arithmetic --out sweep/ --resume\n"
        'Target files are .jsonl of {"prompt": ..., "completion": ...}; the source file is split 3/4 for\n'
        "the curvature and 1/8 + 1/8 for validation and test of forgetting.",
    )
    p.add_argument("model", help="model folder, Hub id, or 'smollm2'")
    p.add_argument("--gguf-file")
    p.add_argument("--source", required=True, metavar="NAME=PATH", help="source text (as for compute)")
    p.add_argument("--target", choices=["arithmetic", "sorting"], help="a generated target task instead of files")
    p.add_argument("--target-train", type=Path)
    p.add_argument("--target-val", type=Path)
    p.add_argument("--target-test", type=Path)
    p.add_argument(
        "--artifact",
        action="append",
        default=[],
        metavar="STRUCTURE=DIR",
        help="use this artifact for diag, diag_lowrank, kron or kron_eig instead of computing it",
    )
    p.add_argument(
        "--methods",
        default="lora,l2,diag,diag_lowrank,kron,kron_eig,lora_init,mtt,milora,flat_lora,migu",
        help="lora (none), l2, diag, diag_lowrank, kron, kron_eig (weight-space LaLoRA), lora_init (the paper's), "
        "mtt (Mask-the-Target, own KL-weight grid 0.1,1,10), milora, flat_lora (own ρ grid 0.01,0.05,0.1), "
        "migu (own t grid .25,.5,.75)",
    )
    p.add_argument("--strengths", default="10,100,1000")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--eig-rank", type=int, default=32)
    p.add_argument("--curvature-batches", type=int, default=8)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument(
        "--priority",
        choices=["retention", "learning"],
        default="retention",
        help="retention: least forgetting at matched target accuracy; learning: best target "
        "accuracy within --budget of source NLL rise",
    )
    p.add_argument("--tolerance", type=float, default=0.01, help="what 'matched' accuracy means (0.01 = 1 point)")
    p.add_argument("--budget", type=float, help="allowed source NLL rise for --priority learning")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs already in OUT/runs.csv (an interrupted sweep, or other methods) and run only the rest",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run)


def _targets(args: argparse.Namespace) -> dict[str, Any]:
    from laplace_hub.evaluation.tasks import read_examples, task_splits

    if args.target is not None:
        return task_splits(args.target, 256, 100, 100)
    files = {"train": args.target_train, "validation": args.target_val, "test": args.target_test}
    missing = [k for k, v in files.items() if v is None]
    if missing:
        raise LaplaceHubError(
            f"give --target TASK or all of --target-train/--target-val/--target-test (missing: {', '.join(missing)})"
        )
    return {k: read_examples(v) for k, v in files.items()}


def run(args: argparse.Namespace) -> int:
    """Run the sweep and write runs.csv, summary.json and pareto.png."""
    from laplace_hub.artifact import Artifact
    from laplace_hub.cli.compute_cmd import check_source, load_texts
    from laplace_hub.data import DatasetSpec
    from laplace_hub.evaluation.report import pareto_plot, read_rows, table, write_json, write_rows
    from laplace_hub.evaluation.sweep import (
        SweepConfig,
        SweepData,
        choices_json,
        choose,
        curvature_artifacts,
        pending_runs,
        run_sweep,
        split_source,
        summarize,
    )
    from laplace_hub.models import load_model

    cfg = SweepConfig(
        methods=parse_list(args.methods, str, "--methods"),
        strengths=parse_list(args.strengths, float, "--strengths"),
        seeds=parse_list(args.seeds, int, "--seeds"),
        targets=args.targets,
        lora_rank=args.lora_rank,
        steps=args.steps,
        lr=args.lr,
        eig_rank=args.eig_rank,
    )
    cfg.check()
    given = {}
    for item in args.artifact:
        structure, _, folder = item.partition("=")
        if structure not in ("diag", "diag_lowrank", "kron", "kron_eig") or not folder:
            raise LaplaceHubError(
                f"--artifact {item!r}: expected STRUCTURE=DIR, STRUCTURE diag, diag_lowrank, kron or kron_eig"
            )
        given[structure] = Artifact.open(folder, verify_checksums=True)
    done = read_rows(args.out / "runs.csv") if args.resume and (args.out / "runs.csv").is_file() else []
    targets = _targets(args)
    source = DatasetSpec.parse(args.source)
    check_source(source)
    model, tokenizer = load_model(args.model, gguf_file=args.gguf_file)
    texts = load_texts(source, model, tokenizer, max_length=args.max_length)
    curvature, source_val, source_test = split_source(
        texts,
        tokenizer,
        curvature_batches=args.curvature_batches,
        eval_batches=args.eval_batches,
        batch_size=4,
        max_length=args.max_length,
    )
    data = SweepData(targets["train"], targets["validation"], targets["test"], curvature, source_val, source_test)
    pending = {method for method, _, _ in pending_runs(cfg, done)}
    missing = dataclasses.replace(cfg, methods=tuple(m for m in cfg.methods if m in pending and m not in given))
    artifacts = {**curvature_artifacts(model, data, missing), **given}
    rows = run_sweep(model, tokenizer, data, cfg, artifacts, done, save=lambda r: write_rows(r, args.out / "runs.csv"))
    summary = summarize(rows)
    choices = choose(summary, args.priority, args.tolerance, args.budget)
    write_rows(rows, args.out / "runs.csv")
    write_json({"summary": summary, "choices": choices_json(choices)}, args.out / "summary.json")
    pareto_plot(summary, args.out / "pareto.png", f"{args.model}: learning vs forgetting")
    if args.json:
        print_json({"summary": summary, "choices": choices_json(choices)})
    else:
        print(table(summary))
        for c in choices:
            print(f"{c.method}: {c.verdict}")
        print(f"files: {args.out / 'runs.csv'}, {args.out / 'summary.json'}, {args.out / 'pareto.png'}")
    return 0
