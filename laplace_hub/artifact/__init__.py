"""Artifacts in memory and on disk: read, write, shard, checksum, lazy loading."""

from laplace_hub.artifact.artifact import Artifact
from laplace_hub.artifact.builder import ArtifactBuilder, minimal_fields, software_versions
from laplace_hub.artifact.compress import compress
from laplace_hub.artifact.merge import merge

__all__ = ["Artifact", "ArtifactBuilder", "compress", "merge", "minimal_fields", "software_versions"]
