"""Learning/forgetting measurement and the end-to-end demo."""

from laplace_hub.evaluation.demo import DemoConfig, format_table, run_demo

__all__ = ["DemoConfig", "format_table", "run_demo"]
