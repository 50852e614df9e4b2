"""Learning/forgetting measurement, λ sweeps, forgetting probes and the end-to-end demo."""

from laplace_hub.evaluation.choice import choose, summarize
from laplace_hub.evaluation.demo import DemoConfig, format_report, run_demo
from laplace_hub.evaluation.probes import PROBE_METRICS, Probes, ProbeSizes, build_probes, probe_metrics
from laplace_hub.evaluation.sweep import METHODS, SweepConfig, SweepData, run_sweep

__all__ = [
    "METHODS",
    "PROBE_METRICS",
    "DemoConfig",
    "ProbeSizes",
    "Probes",
    "SweepConfig",
    "SweepData",
    "build_probes",
    "choose",
    "format_report",
    "probe_metrics",
    "run_demo",
    "run_sweep",
    "summarize",
]
