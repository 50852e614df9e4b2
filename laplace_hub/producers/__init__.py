"""Producers: compute curvature artifacts for Hugging Face causal language models."""

from laplace_hub.producers.compute import ComputeOptions, compute_artifact

__all__ = ["ComputeOptions", "compute_artifact"]
