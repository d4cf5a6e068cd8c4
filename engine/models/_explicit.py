# Explicit model files: `aphro new-model NAME --like FAMILY --explicit` adds one
"""HF architecture -> "module:Class" of every explicit (hand-written) model (merged by
engine/models/registry.py). Edit it by hand to add or remove a model file you wrote."""

EXPLICIT_MODELS: dict[str, str] = {}
