"""The structure registry: one codec per structure of the manifest, each with a conformance vector."""

from __future__ import annotations

import json
from typing import Any

import pytest

from laplace_hub.artifact.structures import REGISTRY, codec_for
from laplace_hub.manifest import BLOCK_ENTRIES, INTRODUCED_IN, STRUCTURES, LoraParameterization, Manifest
from tests.conftest import CONFORMANCE_ROOT, SUPERSEDED


def _valid_manifests() -> list[Manifest]:
    folders = sorted(
        p
        for p in CONFORMANCE_ROOT.glob("*/valid/*")
        if p.is_dir() and p.relative_to(CONFORMANCE_ROOT).as_posix() not in SUPERSEDED
    )
    return [Manifest.model_validate(json.loads((f / "laplace.json").read_text())) for f in folders]


MANIFESTS = _valid_manifests()


def test_the_registry_holds_every_structure_of_the_manifest_in_its_order() -> None:
    assert tuple(REGISTRY) == STRUCTURES
    assert [codec.entry for codec in REGISTRY.values()] == list(BLOCK_ENTRIES)
    for name, codec in REGISTRY.items():
        assert codec.name == name
        assert codec.entry.model_fields["structure"].annotation.__args__ == (name,)


def test_a_structure_of_a_later_minor_says_so() -> None:
    for name, codec in REGISTRY.items():
        assert INTRODUCED_IN.get(f"structure {name}", "1.0") == codec.entry.introduced_in


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_registered_structure_has_a_valid_conformance_vector(name: str) -> None:
    used = {b.structure for m in MANIFESTS for module in m.modules.values() for b in module.blocks}
    assert name in used


def _keys_at(node: Any, fields: frozenset[str]) -> set[str]:
    if not isinstance(node, dict):
        return set()
    found = {v for k, v in node.items() if k in fields and isinstance(v, str)}
    return found.union(*(_keys_at(v, fields) for v in node.values()))


def test_key_fields_name_exactly_the_tensors_an_entry_references() -> None:
    """What a merge re-keys is what the manifest says the entry stores (SPEC.md §4)."""
    seen = set()
    for manifest in MANIFESTS:
        lora = manifest.parameterization
        rank = lora.rank if isinstance(lora, LoraParameterization) else None
        for name, module in manifest.modules.items():
            for index, block in enumerate(module.blocks):
                referenced = {key for key, _, _ in block.tensors(module.shape, rank, f"modules.{name}.blocks.{index}")}
                assert _keys_at(block.model_dump(mode="json"), codec_for(block).key_fields) == referenced
                seen.add(block.structure)
    assert seen == set(STRUCTURES)


def test_the_structures_a_producer_computes_are_the_manifests() -> None:
    from laplace_hub.evaluation.sweep import STRUCTURE_METHODS
    from laplace_hub.producers.options import COMPUTED_STRUCTURES

    assert set(COMPUTED_STRUCTURES) <= set(STRUCTURES)
    assert set(STRUCTURE_METHODS) <= set(STRUCTURES)
