"""What MODEL names in a parity check: a checkpoint folder, or a tiny random-weight checkpoint.

A spec (a name in model_specs/ or a .toml path) gives the tiny model's HF config through its
[tiny] table; a registered architecture without a spec gets a generic tiny config of its HF
model type. `_checkpoint` builds one in a temporary folder for the length of a check.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

from engine.errors import AphroError

SPECS_DIR = Path(__file__).resolve().parent.parent / "model_specs"

# generic tiny config for a registered architecture that has no spec (HF field names; configs
# map them through attribute_map where theirs differ)
TINY_FIELDS = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 512,
               "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def tiny_checkpoint_for(model_name_or_spec: str | Path, out_dir: str | Path,
                        seed: int = 0) -> Path:
    """A tiny random-weight checkpoint (safetensors + tokenizer) in `out_dir` for a registered
    architecture name or a spec (name in model_specs/ or path to a .toml)."""
    from engine.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tiny_config_for(model_name_or_spec), out_dir, seed=seed)


def tiny_config_for(model: str | Path):
    """The HF config of the tiny model: the [tiny] table of the spec `model` names (a .toml
    path, a name in model_specs/, or a registered architecture a spec declares), else a
    generic tiny config of the architecture's HF model type."""
    from engine.models.registry import supported_architectures
    from engine.spec_loader import load_spec, tiny_hf_config

    path, name = Path(model), str(model)
    if path.suffix == ".toml":
        return tiny_hf_config(load_spec(path))
    if (SPECS_DIR / f"{name}.toml").is_file():
        return tiny_hf_config(load_spec(SPECS_DIR / f"{name}.toml"))
    if name not in supported_architectures():
        raise AphroError(f"{name!r} is not a checkpoint folder, a spec or a registered "
                         f"architecture (registered: {', '.join(supported_architectures())}); "
                         "pass a local HF checkpoint folder, a model_specs/*.toml or one of those")
    for file in sorted(SPECS_DIR.glob("*.toml")):
        spec = load_spec(file)
        if name in spec.model.architectures:
            return tiny_hf_config(spec)
    return _generic_tiny_config(name)


def _generic_tiny_config(architecture: str):
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = [t for t, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()
             if cls == architecture or (isinstance(cls, (tuple, list)) and architecture in cls)]
    # several types may share a class (exaone, internlm3, llama -> LlamaForCausalLM): prefer
    # the one the class is named after
    types.sort(key=lambda t: not architecture.lower().startswith(t.replace("_", "")))
    if not types:
        raise AphroError(f"{architecture}: transformers has no causal-LM model of that name, so "
                         "no tiny config can be made for it; give a spec or a checkpoint folder")
    config = AutoConfig.for_model(types[0], **TINY_FIELDS)
    config.architectures = [architecture]
    return config


@contextlib.contextmanager
def _checkpoint(model: str | Path, seed: int, keep: bool, say):
    """(folder, source): the folder given, or a tiny checkpoint built in a temporary one."""
    path = Path(model)
    if path.is_dir():
        yield path, "checkpoint"
        return
    say(f"{model}: building a tiny checkpoint")
    tmp = Path(tempfile.mkdtemp(prefix=f"aphro-parity-{path.stem}-"))
    try:
        with _quiet_transformers():
            ckpt = tiny_checkpoint_for(model, tmp, seed)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        yield ckpt, "tiny"
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _quiet_transformers():
    """No transformers progress bars or warnings over our own progress display."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()

