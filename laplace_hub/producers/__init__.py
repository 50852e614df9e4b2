"""Producers: compute curvature artifacts for Hugging Face causal language models."""

from laplace_hub.producers.compute import compute_artifact
from laplace_hub.producers.options import ComputeOptions, CurvatureOptions, LoraOptions, WriteOptions

__all__ = ["ComputeOptions", "CurvatureOptions", "LoraOptions", "WriteOptions", "compute_artifact"]
