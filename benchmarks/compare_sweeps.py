"""Join sweeps that differ only in their curvature's data into one table and one figure.

    python benchmarks/compare_sweeps.py --sweep pydoc=out/sweep-pydoc --sweep self=out/sweep-self \
        --sweep mix=out/sweep-mix --methods kron --out docs/results/sources
    python benchmarks/compare_sweeps.py --sweep pydoc=out/sweep-pydoc --methods kron,l2 --keep-names --out t

Each sweep's regularised methods are relabelled ``method (label)`` (not with ``--keep-names``);
plain LoRA and the base model do not depend on the curvature, so they are taken from the first
sweep, after checking that every other sweep reproduced them (same test scores per seed; a
mismatch means the sweeps differ in more than their curvature, and the script stops). Writes
``OUT-runs.csv``, ``OUT-summary.json`` (with bootstrap intervals and paired differences) and
``OUT.png``; prints the table, a markdown table of changes from the base model with their
intervals, and each method's λ chosen on validation data.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from laplace_hub.evaluation.choice import choices_json, choose, summarize
from laplace_hub.evaluation.probes import PROBE_LABELS, PROBE_METRICS
from laplace_hub.evaluation.report import pareto_plot, read_rows, table, write_json, write_rows

SHARED = ("base", "lora")
FORGETTING = {"test_source_nll": "in-domain NLL", **{m: PROBE_LABELS[m] for m in PROBE_METRICS}}


def markdown(summary: list[dict]) -> str:
    """Target EM with its interval, and each forgetting measure as the change from the base model
    with its paired interval; ``*`` marks a significant difference from plain LoRA (paired)."""
    shown = {k: v for k, v in FORGETTING.items() if all(f"{k}_ci" in s for s in summary)}
    head = ["method", "λ", "seeds", "target EM (test) [95% CI]", *(f"Δ {v} vs base" for v in shown.values())]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        if s["method"] == "base":
            continue
        em_low, em_high = s["test_target_em_ci"]
        cells = [s["method"], "–" if s["method"] == "lora" else f"{s['strength']:g}", str(s["seeds"])]
        cells.append(f"{s['test_target_em']:.3f} [{em_low:.3f}, {em_high:.3f}]{_mark(s, 'test_target_em')}")
        for key in shown:
            d = s.get(f"{key}_vs_base")
            digits = 3 if key.endswith("_em") else 4
            cells.append(
                "–"
                if d is None
                else f"{d['difference']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]{_mark(s, key)}"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mark(s: dict, key: str) -> str:
    return "*" if s.get(f"{key}_vs_lora", {}).get("significant") else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="append", required=True, metavar="LABEL=DIR")
    parser.add_argument("--methods", default="kron", help="the regularised methods to compare")
    parser.add_argument("--keep-names", action="store_true", help="no relabelling (one sweep)")
    parser.add_argument("--strengths", help="only these strengths of the regularised methods (e.g. the grid)")
    parser.add_argument("--title", default="SmolLM2-135M: curvature from different data")
    parser.add_argument("--out", type=Path, required=True, help="prefix of the files written")
    args = parser.parse_args()
    methods = args.methods.split(",")
    sweeps = [item.split("=", 1) for item in args.sweep]
    strengths = None if args.strengths is None else {float(x) for x in args.strengths.split(",")}
    joined = []
    reference: dict[tuple[str, int | None], float] = {}
    for number, (label, folder) in enumerate(sweeps):
        for row in read_rows(Path(folder) / "runs.csv"):
            key = (row["method"], row["seed"])
            if row["method"] in SHARED:
                if number == 0:
                    reference[key] = row["test_source_nll"]
                    joined.append(row)
                elif key in reference and not math.isclose(reference[key], row["test_source_nll"], rel_tol=1e-9):
                    raise SystemExit(
                        f"{label}: {key} differs from {sweeps[0][0]}'s: not the same sweep but for the curvature"
                    )
            elif row["method"] in methods and (strengths is None or row["strength"] in strengths):
                joined.append(row if args.keep_names else {**row, "method": f"{row['method']} ({label})"})
    write_rows(joined, args.out.with_name(args.out.name + "-runs.csv"))
    summary = summarize(joined)
    choices = choose(summary)
    write_json(
        {"summary": summary, "choices": choices_json(choices)}, args.out.with_name(args.out.name + "-summary.json")
    )
    pareto_plot(summary, args.out.with_suffix(".png"), args.title)
    print(table(summary))
    print()
    print(markdown(summary))
    for choice in choices:
        print(f"{choice.method}: {choice.verdict}")


if __name__ == "__main__":
    main()
