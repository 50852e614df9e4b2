"""Choosing λ: mean and spread over seeds, then one strength per method picked on validation means.

The choice is made on validation data and reported on test data, as the LaLoRA paper does, so
that the reported numbers are not the ones λ was tuned on.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from laplace_hub.errors import LaplaceHubError
from laplace_hub.evaluation.metrics import EXAMPLES, Scores
from laplace_hub.evaluation.probes import PROBE_METRICS
from laplace_hub.evaluation.stats import Draws, difference, interval

METRICS = ("target_em", "source_nll", "source_accuracy")


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds of every metric, per (method, strength).

    The probes' metrics (one set, no split) are summarised where every run of the group has them.
    Where the runs carry per-example scores, each test metric and probe also gets its bootstrap 95 %
    interval (``<metric>_ci``) and its paired difference to plain LoRA and to the base model
    (``<metric>_vs_lora``, ``<metric>_vs_base``: difference, interval, significant), from
    :mod:`~laplace_hub.evaluation.stats`.
    """
    groups: dict[tuple[str, float], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["strength"]), []).append(row)
    summary = []
    for (method, strength), members in groups.items():
        entry: dict[str, Any] = {"method": method, "strength": strength, "seeds": len(members)}
        for split in ("val", "test"):
            for metric in METRICS:
                values = [m[f"{split}_{metric}"] for m in members]
                entry[f"{split}_{metric}"] = statistics.fmean(values)
                entry[f"{split}_{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        for metric in PROBE_METRICS:
            probed = [m[metric] for m in members if m.get(metric) is not None]
            if probed and len(probed) == len(members):
                entry[metric] = statistics.fmean(probed)
                entry[f"{metric}_std"] = statistics.stdev(probed) if len(probed) > 1 else 0.0
        entry["seconds"] = statistics.fmean(m["seconds"] for m in members)
        summary.append(entry)
    references = {name: groups.get((name, 0.0), []) for name in ("lora", "base")}
    for entry in summary:
        _add_intervals(entry, groups[(entry["method"], entry["strength"])], references)
        _add_forgetting(entry)
    return summary


FORGETTING = "forgetting"
"""PEFT's MetaMathQA benchmark's forgetting: the mean per-token loss on held-out general text after
fine-tuning minus before (``wiki_loss_after - wiki_loss_before``), here on the out-of-domain probe,
with its paired interval. PEFT's code compares each position's logits with the token at that same
position; this is the next-token loss its docstring describes (docs/results.md says more)."""


def _add_forgetting(entry: dict[str, Any]) -> None:
    if entry["method"] == "base" and "ood_nll" in entry:
        entry[FORGETTING], entry[f"{FORGETTING}_std"], entry[f"{FORGETTING}_ci"] = 0.0, 0.0, [0.0, 0.0]
    elif (versus := entry.get("ood_nll_vs_base")) is not None:
        entry[FORGETTING], entry[f"{FORGETTING}_ci"] = versus["difference"], [versus["low"], versus["high"]]
        entry[f"{FORGETTING}_std"] = entry.get("ood_nll_std", 0.0)
        if "ood_nll_vs_lora" in entry:  # the base cancels: the same paired test against LoRA
            entry[f"{FORGETTING}_vs_lora"] = entry["ood_nll_vs_lora"]


INTERVAL_METRICS = tuple(f"test_{m}" for m in METRICS) + PROBE_METRICS
"""The metrics that get bootstrap intervals (test data and probes; validation only chooses λ)."""


def _add_intervals(
    entry: dict[str, Any], members: Sequence[Mapping[str, Any]], references: Mapping[str, Sequence[Mapping[str, Any]]]
) -> None:
    for metric in INTERVAL_METRICS:
        runs = _per_seed(members, metric)
        if runs is None:
            continue
        draws = Draws.make(tuple(runs), len(next(iter(runs.values())).values))
        entry[f"{metric}_ci"] = list(interval(draws.means(runs)))
        for name, reference in references.items():
            against = _per_seed(reference, metric)
            if entry["method"] == name or against is None or not _pairable(runs, against):
                continue
            entry[f"{metric}_vs_{name}"] = asdict(difference(draws, runs, against))


def _per_seed(members: Sequence[Mapping[str, Any]], metric: str) -> dict[int | None, Scores] | None:
    """Each run's per-example scores of ``metric`` by seed, or None where a run lacks them."""
    runs = {m["seed"]: m.get(f"{metric}{EXAMPLES}") for m in members}
    if not runs or any(not isinstance(s, Scores) for s in runs.values()) or len(runs) != len(members):
        return None
    return runs  # type: ignore[return-value]


def _pairable(runs: Mapping[int | None, Scores], against: Mapping[int | None, Scores]) -> bool:
    """Same examples, and the same seeds (or a reference of one unseeded run: the base model)."""
    size = len(next(iter(runs.values())).values)
    same_examples = all(len(s.values) == size for s in (*runs.values(), *against.values()))
    return same_examples and (set(against) == set(runs) or set(against) == {None})


@dataclass(frozen=True)
class Choice:
    """The strength chosen for one method on validation data, and how it fares on test data."""

    method: str
    strength: float
    test_target_em: float
    test_source_nll: float
    forgetting_removed: float | None
    matched: bool
    verdict: str
    probes: dict[str, float] = field(default_factory=dict)
    """The forgetting probes' means at the chosen strength (none when the sweep measured none)."""


def choose(
    summary: Sequence[Mapping[str, Any]],
    priority: Literal["retention", "learning"] = "retention",
    tolerance: float = 0.01,
    budget: float | None = None,
) -> list[Choice]:
    """Pick λ per method on validation means.

    * ``retention``: the lowest validation source NLL among strengths whose validation target
      exact match is within ``tolerance`` of plain LoRA's (matched learning).
    * ``learning``: the best validation target exact match among strengths whose validation source
      NLL rises by at most ``budget`` over the base model.
    """
    by = {(s["method"], s["strength"]): s for s in summary}
    base, lora = by.get(("base", 0.0)), by.get(("lora", 0.0))
    if base is None or lora is None:
        raise LaplaceHubError("choosing λ needs the base model's and plain LoRA's rows")
    lora_rise = lora["test_source_nll"] - base["test_source_nll"]
    choices = []
    for method in dict.fromkeys(s["method"] for s in summary if s["method"] not in ("base", "lora")):
        candidates = [s for s in summary if s["method"] == method]
        if priority == "retention":
            ok = [s for s in candidates if s["val_target_em"] >= lora["val_target_em"] - tolerance] or candidates
            best = min(ok, key=lambda s: s["val_source_nll"])
        else:
            limit = base["val_source_nll"] + (budget if budget is not None else lora_rise / 2)
            ok = [s for s in candidates if s["val_source_nll"] <= limit] or candidates
            best = max(ok, key=lambda s: s["val_target_em"])
        rise = best["test_source_nll"] - base["test_source_nll"]
        removed = 1 - rise / lora_rise if lora_rise > 0 else None
        matched = best["test_target_em"] >= lora["test_target_em"] - tolerance
        verdict = (
            f"λ={best['strength']:g}: test EM {best['test_target_em']:.3f} vs LoRA {lora['test_target_em']:.3f}"
            f" ({'matched' if matched else 'NOT matched'}), source NLL rise {rise:+.4f} vs LoRA "
            f"{lora_rise:+.4f}" + (f" ({removed:.0%} of LoRA's forgetting removed)" if removed is not None else "")
        )
        probes = {m: best[m] for m in PROBE_METRICS if m in best}
        choices.append(
            Choice(
                method,
                best["strength"],
                best["test_target_em"],
                best["test_source_nll"],
                removed,
                matched,
                verdict,
                probes,
            )
        )
    return choices


def choices_json(choices: Sequence[Choice]) -> list[dict[str, Any]]:
    """Choices as JSON data."""
    return [asdict(c) for c in choices]
