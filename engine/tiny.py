"""Tiny random-weight checkpoints for tests and `aphro parity-check`.

Every parameter is randomised, norm weights around 1 and biases away from 0, so a model that
drops a bias or a norm weight cannot agree with transformers by accident.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import torch

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


def _is_norm(module: torch.nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


@torch.no_grad()
def randomize_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Re-draw every parameter: matrices N(0, 1/fan_in) (output head 2x), norms 1 ± 0.1,
    biases N(0, 0.1). Deterministic for a seed."""
    gen = torch.Generator().manual_seed(seed)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_weight = getattr(head, "weight", None)
    done: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in done:  # tied parameters are drawn once
                continue
            done.add(id(param))
            if _is_norm(module):
                sample = (1.0 if name == "weight" else 0.0) + 0.1 * torch.randn(
                    param.shape, generator=gen)
            elif param.dim() == 1:
                sample = 0.1 * torch.randn(param.shape, generator=gen)
            else:
                gain = 2.0 if param is head_weight else 1.0  # logits std ~2: not near-uniform
                sample = gain / math.sqrt(param.shape[-1]) * torch.randn(param.shape,
                                                                         generator=gen)
            param.copy_(sample.to(param.dtype))


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
    if not (out / "generation_config.json").is_file():
        model.generation_config.save_pretrained(str(out))
    train_tokenizer(out, config.vocab_size)
    return out
