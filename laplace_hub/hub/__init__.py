"""The hub layer: push, pull and find artifacts on the Hugging Face Hub or a local folder hub."""

import sys

from laplace_hub.artifact.artifact import connect_hub_layer
from laplace_hub.hub.find import FoundArtifact, find
from laplace_hub.hub.pull import Origin, pull, split_repo_revision
from laplace_hub.hub.push import PushResult, push
from laplace_hub.hub.remote import RemoteReport, validate_remote

connect_hub_layer(sys.modules[__name__])  # this module provides pull and push

__all__ = [
    "FoundArtifact",
    "Origin",
    "PushResult",
    "RemoteReport",
    "find",
    "pull",
    "push",
    "split_repo_revision",
    "validate_remote",
]
