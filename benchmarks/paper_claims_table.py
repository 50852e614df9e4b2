"""The tables of docs/results.md's "The paper's claims" from benchmarks/paper_claims.sh's summaries.

One Markdown table per part: test target EM, the in-domain source NLL rise over the base model,
PEFT's forgetting (out-of-domain per-token loss after minus before) and the paired difference of
the source NLL to plain LoRA, each with its 95 % interval over seeds and test examples.

    python benchmarks/paper_claims_table.py out/paper
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

PARTS = ("forms", "ns-1", "ns-2", "ns-3", "rank-32", "tuned", "steps-120")


def _interval(entry: dict[str, Any], key: str, digits: int) -> str:
    value, ci = entry.get(key), entry.get(f"{key}_ci")
    if value is None:
        return "–"
    return f"{value:+.{digits}f} [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]" if ci else f"{value:+.{digits}f}"


def _versus(entry: dict[str, Any], key: str, digits: int) -> str:
    found = entry.get(key)
    if not found:
        return "–"
    mark = "*" if found["significant"] else ""
    return f"{found['difference']:+.{digits}f} [{found['low']:+.{digits}f}, {found['high']:+.{digits}f}]{mark}"


def table(summary: list[dict[str, Any]]) -> str:
    """One row per method and strength, the base model first."""
    lines = [
        "| method | λ | seeds | test EM [95 % CI] | source NLL rise vs base | forgetting (PEFT) | source NLL vs LoRA |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        em = s["test_target_em"]
        ci = s.get("test_target_em_ci")
        em_text = f"{em:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{em:.3f}"
        strength = "–" if s["method"] in ("base", "lora") else f"{s['strength']:g}"
        lines.append(
            f"| {s['method']} | {strength} | {s['seeds']} | {em_text} | "
            f"{_versus(s, 'test_source_nll_vs_base', 4)} | {_interval(s, 'forgetting', 4)} | "
            f"{_versus(s, 'test_source_nll_vs_lora', 4)} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Print every part that has a summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the OUT folder of benchmarks/paper_claims.sh")
    args = parser.parse_args()
    for part in PARTS:
        path = args.root / part / "summary.json"
        if path.is_file():
            print(f"### {part}\n\n{table(json.loads(path.read_text())['summary'])}\n")


if __name__ == "__main__":
    main()
