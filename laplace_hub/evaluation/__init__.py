"""Learning/forgetting measurement, λ sweeps and the end-to-end demo."""

from laplace_hub.evaluation.choice import choose, summarize
from laplace_hub.evaluation.demo import DemoConfig, format_report, run_demo
from laplace_hub.evaluation.sweep import METHODS, SweepConfig, SweepData, run_sweep

__all__ = [
    "METHODS",
    "DemoConfig",
    "SweepConfig",
    "SweepData",
    "choose",
    "format_report",
    "run_demo",
    "run_sweep",
    "summarize",
]
