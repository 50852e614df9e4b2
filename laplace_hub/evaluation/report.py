"""Sweep results as files a person or a script reads: CSV, JSON, tables and a Pareto plot per forgetting measure."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from laplace_hub.errors import DataError, MissingExtraError
from laplace_hub.evaluation.choice import FORGETTING
from laplace_hub.evaluation.metrics import EXAMPLES, Scores
from laplace_hub.evaluation.probes import PROBE_LABELS, PROBE_METRICS


def write_rows(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Every run as CSV (one row per method, strength and seed); a column a row lacks stays empty.

    Per-example scores (``*_examples`` columns) go last, as :meth:`Scores.encode` text.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    columns.sort(key=lambda c: c.endswith(EXAMPLES))  # stable: the metrics first, as they came
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: v.encode() if isinstance(v, Scores) else v for k, v in row.items()} for row in rows)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows that :func:`write_rows` wrote, with numbers as numbers and per-example scores as :class:`Scores`.

    An empty seed, metric or per-example cell (what an older sweep did not measure) is ``None``.
    """

    def value(column: str, text: str) -> Any:
        if column == "method":
            return text
        if column == "seed":
            return int(text) if text else None
        if column not in ("strength", "seconds") and not text:
            return None
        if column.endswith(EXAMPLES):
            return Scores.decode(text)
        return float(text)

    try:
        with path.open(newline="") as f:
            rows = [{column: value(column, text) for column, text in row.items()} for row in csv.DictReader(f)]
    except (OSError, ValueError, TypeError) as e:
        raise DataError(f"{path}: not a runs.csv that `laplace-hub sweep` wrote ({e})") from e
    if rows and not {"method", "strength", "seed"} <= set(rows[0]):
        raise DataError(f"{path}: not a runs.csv that `laplace-hub sweep` wrote (no method/strength/seed columns)")
    return rows


def write_json(data: Any, path: Path) -> None:
    """Any JSON-able result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def table(summary: Sequence[Mapping[str, Any]]) -> str:
    """Test means, one line per method and strength; probes, if measured, in a second table below.

    Each cell is the mean with its bootstrap 95 % interval over seeds and test examples, marked
    ``*`` where the paired difference to plain LoRA is significant; a sweep without per-example
    scores (an older ``runs.csv``) shows mean ± sd over seeds instead.
    """
    width = max(10, *(len(s["method"]) for s in summary))
    columns = {"test_target_em": "target EM (test)", "test_source_nll": "source NLL (test)"}
    columns |= {"test_source_accuracy": "source acc (test)"}
    probes = {**PROBE_LABELS, FORGETTING: "forgetting (PEFT)"}
    columns_probes = {m: probes[m] for m in (*PROBE_METRICS, FORGETTING) if all(m in s for s in summary)}
    lines = []
    for title, shown in (("", columns), ("forgetting probes", columns_probes)):
        if not shown:
            continue
        cells = [[_cell(s, key) for key in shown] for s in summary]
        widths = [max(len(label), *(len(row[i]) for row in cells)) for i, label in enumerate(shown.values())]
        head = f"{title or 'method':<{width}} {'' if title else 'λ':>7} {'' if title else 'seeds':>5}"
        lines += [
            "" if title else None,
            head + "".join(f"  {t:>{w}}" for t, w in zip(shown.values(), widths, strict=True)),
        ]
        lines += [
            _run(s, width) + "".join(f"  {c:>{w}}" for c, w in zip(row, widths, strict=True))
            for s, row in zip(summary, cells, strict=True)
        ]
    if any(f"{key}_ci" in s for s in summary for key in columns):
        lines += ["", "mean [bootstrap 95% interval over seeds and test examples]; * differs from plain LoRA (paired)"]
    return "\n".join(line for line in lines if line is not None)


def _run(s: Mapping[str, Any], width: int) -> str:
    strength = "-" if s["method"] in ("base", "lora") else f"{s['strength']:g}"
    return f"{s['method']:<{width}} {strength:>7} {s['seeds']:>5}"


def _cell(s: Mapping[str, Any], key: str) -> str:
    digits = 4 if key.endswith(("_nll", "_accuracy", FORGETTING)) else 3
    if f"{key}_ci" not in s:
        return f"{s[key]:.{digits}f} ± {s[f'{key}_std']:.{digits}f}"
    low, high = s[f"{key}_ci"]
    mark = "*" if s.get(f"{key}_vs_lora", {}).get("significant") else " "
    return f"{s[key]:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]{mark}"


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MissingExtraError("matplotlib", "demo") from e
    return plt


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)


def pareto_plot(summary: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """Target exact match (test) against each forgetting measure: one panel per measure.

    The held-out source NLL (test) always; then each probe the sweep measured. One line per
    method, marker size by λ; whiskers are the paired bootstrap 95 % intervals of each point's
    change from the base model, where the runs carry per-example scores.
    """
    plt = _pyplot()
    axes_x = {"test_source_nll": "held-out source NLL per token (test, lower = less forgetting)"}
    for m in PROBE_METRICS:
        if all(m in s for s in summary):
            better = "lower" if m.endswith("_nll") else "higher"
            axes_x[m] = f"{PROBE_LABELS[m]} ({better} = less forgetting)"
    columns = min(3, len(axes_x))
    rows = math.ceil(len(axes_x) / columns)
    size = (9, 5.5) if len(axes_x) == 1 else (5 * columns + 1.5, 4 * rows)
    fig, grid = plt.subplots(rows, columns, figsize=size, squeeze=False)
    colors, markers = plt.get_cmap("tab20"), "osD^vPXh<>p"
    for ax, (key, label) in zip(grid.flat, axes_x.items(), strict=False):
        for index, method in enumerate(dict.fromkeys(s["method"] for s in summary)):
            points = sorted((s for s in summary if s["method"] == method), key=lambda s: s["strength"])
            x = [p[key] for p in points]
            y = [p["test_target_em"] for p in points]
            sizes = [30 + 25 * math.log10(1 + p["strength"]) for p in points]
            style = {
                "color": colors((2 * index + index // 10) % 20),  # dark shades first, then light
                "marker": "*" if method == "base" else markers[index % len(markers)],
            }
            ax.plot(x, y, "-", alpha=0.5, color=style["color"])
            ax.scatter(x, y, s=sizes, label=method, **style)
            xerr, yerr = _whiskers(points, key), _whiskers(points, "test_target_em")
            if xerr is not None and yerr is not None:  # bootstrap 95 % whiskers
                ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="none", ecolor=style["color"], alpha=0.35, capsize=2)
            for p, xi, yi in zip(points, x, y, strict=True):
                if method not in ("base", "lora"):
                    ax.annotate(f"{p['strength']:g}", (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label, fontsize=9 if len(axes_x) > 1 else None)
        ax.locator_params(axis="x", nbins=5)
        ax.grid(alpha=0.3)
    for ax in grid[:, 0]:
        ax.set_ylabel("target exact match (test, higher = more learning)", fontsize=9 if len(axes_x) > 1 else None)
    for ax in list(grid.flat)[len(axes_x) :]:
        ax.axis("off")
    if len(axes_x) == 1:
        grid[0, 0].set_title(title)
        grid[0, 0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    else:
        fig.suptitle(title)
        grid[0, -1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    _save(fig, path)


def _whiskers(points: Sequence[Mapping[str, Any]], key: str) -> list[list[float]] | None:
    """Errorbar lengths (down, up) of each point's paired interval of its change from the base model.

    The examples are the same for every model, so their spread is not counted; None where a point
    has no interval.
    """
    changes = [p.get(f"{key}_vs_base") for p in points]
    if any(c is None for c in changes):
        return None
    return [[c["difference"] - c["low"] for c in changes], [c["high"] - c["difference"] for c in changes]]  # type: ignore[index]


def bar_panels(
    summary: Sequence[Mapping[str, Any]],
    label: str,
    panels: Mapping[str, str],
    path: Path,
    title: str,
    columns: int = 4,
) -> None:
    """One bar chart per metric (``panels``: key → axis title), a bar per row (mean ± sd), ``columns`` a row."""
    plt = _pyplot()
    columns = min(columns, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, grid = plt.subplots(rows, columns, figsize=(4 * columns, 4 * rows), squeeze=False)
    for ax in list(grid.flat)[len(panels) :]:
        ax.axis("off")
    names = [str(s[label]) for s in summary]
    for ax, (key, axis_title) in zip(grid.flat, panels.items(), strict=False):
        means, stds = [s[key] for s in summary], [s.get(f"{key}_std", 0.0) for s in summary]
        ax.bar(range(len(names)), means, yerr=stds, color=[f"C{i}" for i in range(len(names))], capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        low, high = (
            min(m - e for m, e in zip(means, stds, strict=True)),
            max(m + e for m, e in zip(means, stds, strict=True)),
        )
        ax.set_ylim(low - 0.1 * (high - low + 1e-9), high + 0.1 * (high - low + 1e-9))
        ax.set_title(axis_title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    _save(fig, path)
