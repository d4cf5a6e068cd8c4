"""Shared fixtures: tiny random-weight checkpoints, built once per session."""

from __future__ import annotations

import os
import shutil
import tempfile

import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path

import pytest

from engine.validate.tiny import make_tiny_checkpoint, tiny_llama_config


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """make_checkpoint(hf_config, name="ckpt", **make_tiny_checkpoint kwargs) -> Path."""

    def make(hf_config, name: str = "ckpt", **kwargs) -> Path:
        return make_tiny_checkpoint(hf_config, tmp_path_factory.mktemp(name), **kwargs)

    return make


@pytest.fixture(scope="session")
def tiny_llama_dir(make_checkpoint) -> Path:
    return make_checkpoint(tiny_llama_config(), "tiny_llama")


@pytest.fixture(scope="session")
def tiny_llama_tied_dir(make_checkpoint) -> Path:
    return make_checkpoint(tiny_llama_config(tie_word_embeddings=True), "tiny_llama_tied")


def pytest_configure(config):
    """No test reads or writes the user's real model registry (engine.models.records): every
    test process (and what it starts) gets an empty one of its own; tests that register point
    APHRO_REGISTRY at their own file."""
    config.aphro_registry_dir = tempfile.mkdtemp(prefix="aphro-test-registry-")
    os.environ["APHRO_REGISTRY"] = os.path.join(config.aphro_registry_dir, "registry.json")


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "aphro_registry_dir", ""), ignore_errors=True)


@pytest.fixture(scope="session")
def family_checkpoint(tmp_path_factory):
    """family_checkpoint(name) -> the tiny checkpoint of a family (spec name or architecture),
    built once per session."""
    from engine.validate.tiny import tiny_checkpoint_for

    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = tiny_checkpoint_for(family, tmp_path_factory.mktemp(family))
        return made[family]

    return get


def pytest_collection_modifyitems(config, items):
    slow = pytest.mark.slow
    for item in items:  # a module's TP=4 repeats outside its TP4_IN_DEFAULT_RUN (test_tp.py)
        keep = getattr(getattr(item, "module", None), "TP4_IN_DEFAULT_RUN", None)
        if (keep is not None and "[tp4" in item.name and item.name not in keep
                and "cuda" not in item.keywords):
            item.add_marker(slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
