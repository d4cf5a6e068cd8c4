"""Tiny random-weight checkpoints for tests and `aphro parity-check`, and what MODEL names in a
check: a checkpoint folder, or a tiny checkpoint built from a spec's [tiny] table, from the tiny
config a registered class declares (`hf_model_type`, `tiny_config`: generated and explicit
models do), or from a generic tiny config of a registered architecture's HF model type.

Weights come from engine.checkpoint.random_weights (every parameter drawn, norm weights around 1
and biases away from 0, so a model that drops a bias or a norm weight cannot agree with
transformers by accident); the tokenizer is a byte-level BPE trained here on a small corpus.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from engine.checkpoint.random_weights import randomize_weights
from engine.errors import AphroError

BOS_ID, EOS_ID, UNK_ID, PAD_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ("<s>", "</s>", "<unk>", "<pad>")  # ids 0..3, in this order
_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # byte-level alphabet + special tokens

CORPUS = """\
The quick brown fox jumps over the lazy dog.
A paged attention engine keeps the key and value cache in fixed-size blocks.
She sold seven sea shells by the shore on a windy Tuesday morning.
Numbers like 3, 14, 159 and 2653 appear in tables, prices and dates.
The scheduler decides which sequences run in the next step.
Rain fell on the old stone bridge while the river rose slowly.
Please write a short poem about the moon, the stars and the sea.
Tokenizers split text into pieces that a model can count and embed.
He asked, "Where is the library?" and she pointed to the hill.
Bread, cheese, apples and tea were packed for the long journey north.
In 1969 two astronauts walked on the surface of the moon.
The cat slept in a patch of sunlight beside the open window.
Matrix multiplication is the heart of every transformer layer.
Our team meets every Monday at nine to plan the week ahead.
If the test fails, read the error message before changing the code.
Birds sang in the garden as the first light reached the trees.
The museum opens at ten and closes at six, except on holidays.
Water boils at one hundred degrees Celsius at sea level.
A small boat drifted past the lighthouse just after midnight.
Greedy decoding always picks the token with the highest probability.
The children built a tall castle of sand and shells on the beach.
Keep your answers short, clear and honest.
Mountains covered in snow rose far beyond the quiet valley.
The recipe needs two eggs, a cup of flour and a pinch of salt.
Every block of memory has a reference count and a hash of its tokens.
Why do leaves turn red and yellow in the autumn?
The train to the city leaves from platform four at half past eight.
Light travels faster than sound, so we see lightning before thunder.
She opened the letter, smiled, and read it twice by the fire.
Logits are turned into probabilities with a softmax over the vocabulary.
The market was loud with voices, music and the smell of spices.
Dogs, cats, horses and rabbits all lived together on the farm.
Save your work often, and keep a copy of every important file.
The professor drew a diagram of the network on the blackboard.
Hello world! This is a tiny model with random weights.
On clear nights you can see thousands of stars above the desert.
The engine serves many requests at once by batching their tokens.
Fresh snow fell during the night and covered every road and roof.
Can you tell me the time, please? It is a quarter to five.
The end of a sentence is marked by a period, a question mark or an exclamation mark.
"""


def train_tokenizer(out_dir: str | os.PathLike, vocab_size: int):
    """Train a byte-level BPE on CORPUS and save it where AutoTokenizer loads it offline.

    Special tokens <s>, </s>, <unk>, <pad> get ids 0..3; encoding prepends <s>. The trained
    vocabulary has at most `vocab_size` entries (fewer when the corpus runs out of merges).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < _MIN_VOCAB:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level tokenizer needs at least "
                         f"{_MIN_VOCAB} ids")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    bos = SPECIAL_TOKENS[BOS_ID]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, BOS_ID)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL_TOKENS[BOS_ID], eos_token=SPECIAL_TOKENS[EOS_ID],
        unk_token=SPECIAL_TOKENS[UNK_ID], pad_token=SPECIAL_TOKENS[PAD_ID],
        clean_up_tokenization_spaces=False)
    fast.save_pretrained(str(out_dir))
    return fast


def tiny_llama_config(**overrides):
    """A tiny GQA Llama config; `rope_scaling={"rope_type": "llama3", ...}` may be overridden."""
    from transformers import LlamaConfig

    fields = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 512,
              "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": BOS_ID,
              "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
              "architectures": ["LlamaForCausalLM"]}
    return LlamaConfig(**(fields | overrides))


def make_tiny_checkpoint(hf_config, out_dir: str | os.PathLike, seed: int = 0,
                         dtype: torch.dtype = torch.float32,
                         shard_max_bytes: int | None = None) -> Path:
    """Write a random-weight HF checkpoint of `hf_config` plus a trained tokenizer to `out_dir`.

    The saved config gets the tokenizer's special ids (bos 0, eos 1, pad 3). With
    `shard_max_bytes` the weights are sharded (model-0000k-of-0000n.safetensors + index).
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(hf_config)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = BOS_ID, EOS_ID, PAD_ID
    if config.vocab_size < _MIN_VOCAB:
        raise ValueError(f"vocab_size={config.vocab_size}: tiny checkpoints need at least "
                         f"{_MIN_VOCAB} for the byte-level tokenizer")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    randomize_weights(model, seed)
    model = model.to(dtype).eval()
    model.config.dtype = dtype
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                                               pad_token_id=PAD_ID)
    kwargs = {} if shard_max_bytes is None else {"max_shard_size": shard_max_bytes}
    model.save_pretrained(str(out), **kwargs)
    _keep_architectures(out / "config.json", getattr(hf_config, "architectures", None))
    if not (out / "generation_config.json").is_file():
        model.generation_config.save_pretrained(str(out))
    train_tokenizer(out, config.vocab_size)
    return out


def _keep_architectures(config_json: Path, architectures: list[str] | None) -> None:
    """save_pretrained writes the HF class it built (LlamaForCausalLM for model_type llama);
    the checkpoint must name the architecture asked for, which the engine then resolves (a
    model of one's own over HF's code of an existing model type)."""
    if not architectures:
        return
    raw = json.loads(config_json.read_text(encoding="utf-8"))
    if raw.get("architectures") != list(architectures):
        raw["architectures"] = list(architectures)
        config_json.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# -- what MODEL names ----------------------------------------------------------------------
SPECS_DIR = Path(__file__).resolve().parents[2] / "model_specs"

# generic tiny config for a registered architecture that has no spec (HF field names; configs
# map them through attribute_map where theirs differ)
TINY_FIELDS = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 512,
               "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def tiny_checkpoint_for(model_name_or_spec: str | Path, out_dir: str | Path,
                        seed: int = 0) -> Path:
    """A tiny random-weight checkpoint (safetensors + tokenizer) in `out_dir` for a registered
    architecture name or a spec (name in model_specs/ or path to a .toml)."""
    return make_tiny_checkpoint(tiny_config_for(model_name_or_spec), out_dir, seed=seed)


def spec_dirs() -> list[Path]:
    """Where a spec name is looked up: the current project's model_specs/, then the
    checkout's."""
    from engine.models.registry import project_root

    root = project_root()
    return ([root / "model_specs"] if root is not None else []) + [SPECS_DIR]


def tiny_config_for(model: str | Path):
    """The HF config of the tiny model: the [tiny] table of the spec `model` names (a .toml
    path, or a name in spec_dirs()), else, for a registered architecture, the tiny config its
    class declares (`hf_model_type` and `tiny_config`, as every generated and explicit model
    does), else a generic tiny config of the architecture's HF model type."""
    from engine.models.registry import (
        did_you_mean,
        load_class,
        resolve,
        supported_architectures,
    )
    from engine.spec.loader import build_hf_config, load_spec, tiny_hf_config

    path, name = Path(model), str(model)
    if path.suffix == ".toml":
        return tiny_hf_config(load_spec(path))
    for folder in spec_dirs():
        if (folder / f"{name}.toml").is_file():
            return tiny_hf_config(load_spec(folder / f"{name}.toml"))
    if "/" in name or name.startswith("."):  # meant as a path
        what = "is a file, not a checkpoint folder" if path.is_file() else "does not exist"
        raise AphroError(f"{name}: {what} (a checkpoint folder holds config.json and the "
                         "weights)")
    if name not in supported_architectures():
        raise AphroError(f"{name!r} is not a checkpoint folder, a spec or a registered "
                         f"architecture.{did_you_mean(name)} Registered: "
                         f"{', '.join(supported_architectures())}; pass a local HF checkpoint "
                         "folder, a model_specs/*.toml or one of those")
    cls = load_class(resolve(name))
    if getattr(cls, "tiny_config", None) is not None:
        where = f"{cls.__module__}.{cls.__qualname__}.hf_model_type"
        return build_hf_config(getattr(cls, "hf_model_type", None), name, cls.tiny_config, where)
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
def model_folder(model: str | Path, seed: int = 0, say=lambda msg: None):
    """A checkpoint folder for MODEL: the folder given, or a tiny random-weight checkpoint of a
    registered architecture or spec, built in a temporary folder for the length of the block."""
    with tiny_or_folder(model, seed, False, say) as (path, _):
        yield path


@contextlib.contextmanager
def tiny_or_folder(model: str | Path, seed: int, keep: bool, say):
    """(folder, source): the folder given, or a tiny checkpoint built in a temporary one."""
    path = Path(model)
    if path.is_dir():
        yield path, "checkpoint"
        return
    config = tiny_config_for(model)  # an unknown name or a broken spec fails here, first
    say(f"{model}: building a tiny checkpoint")
    tmp = Path(tempfile.mkdtemp(prefix=f"aphro-parity-{path.stem}-"))
    try:
        with quiet_transformers():
            ckpt = make_tiny_checkpoint(config, tmp, seed=seed)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        yield ckpt, "tiny"
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def quiet_transformers():
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

