"""laplace-hub: publish and use Laplace (curvature) artifacts that make LoRA fine-tuning forget less."""

from laplace_hub import hub  # noqa: F401  (registers Artifact.from_pretrained / push_to_hub)
from laplace_hub.artifact import Artifact, ArtifactBuilder
from laplace_hub.errors import LaplaceHubError
from laplace_hub.manifest import SPEC_VERSION, Manifest
from laplace_hub.validate import Report, validate

__version__ = "0.1.0"
"""The package version (the spec version is :data:`SPEC_VERSION`)."""

__all__ = [
    "SPEC_VERSION",
    "Artifact",
    "ArtifactBuilder",
    "LaplaceHubError",
    "Manifest",
    "Report",
    "__version__",
    "validate",
]
