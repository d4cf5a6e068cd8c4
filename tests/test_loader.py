"""engine.checkpoint.files: config, eos ids, tokenizer, weights (single, sharded, .bin), LoadTracker."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.checkpoint.files import (
    eos_token_ids,
    iterate_weights,
    load_generation_config,
    load_hf_config,
    load_tokenizer,
)
from engine.checkpoint.report import LoadTracker, check_loaded
from engine.errors import CheckpointError
from engine.validate.tiny import BOS_ID, EOS_ID, tiny_llama_config


@pytest.fixture(scope="module")
def tiny_sharded_dir(make_checkpoint) -> Path:
    return make_checkpoint(tiny_llama_config(), "tiny_llama_sharded", shard_max_bytes=100_000)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(file: Path, edit) -> None:
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data))


# --- config -----------------------------------------------------------------------------------

def test_config_reads_and_rejects_bad_files(tiny_llama_dir, tmp_path):
    cfg = load_hf_config(tiny_llama_dir)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_key_value_heads"] == 2
    with pytest.raises(CheckpointError, match="config.json: missing"):
        load_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: invalid JSON"):
        load_hf_config(tmp_path)
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        load_hf_config(tmp_path / "nowhere")


def test_auto_map_never_imports_code(tiny_llama_dir, tmp_path):
    ckpt = _copy(tiny_llama_dir, tmp_path / "ckpt")
    marker = tmp_path / "imported"
    (ckpt / "aphro_evil_module.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nraise RuntimeError('remote code was imported')\n")
    auto_map = {"AutoConfig": "aphro_evil_module.EvilConfig",
                "AutoModelForCausalLM": "aphro_evil_module.EvilModel",
                "AutoTokenizer": ["aphro_evil_module.EvilTokenizer", None]}
    _edit_json(ckpt / "config.json", lambda d: d.update(auto_map=auto_map))
    _edit_json(ckpt / "tokenizer_config.json", lambda d: d.update(auto_map=auto_map))

    assert load_hf_config(ckpt)["num_hidden_layers"] == 2
    assert eos_token_ids(ckpt) == [EOS_ID]
    assert len(dict(iterate_weights(ckpt))) > 0
    try:
        load_tokenizer(ckpt)
    except CheckpointError:
        pass  # refusing is fine; importing is not
    assert not marker.exists()
    assert "aphro_evil_module" not in sys.modules


# --- eos ids ----------------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [(7, [7]), ([1, 9, 1], [1, 9])])
def test_eos_from_generation_config(tiny_llama_dir, tmp_path, value, expected):
    ckpt = _copy(tiny_llama_dir, tmp_path / "ckpt")
    _edit_json(ckpt / "generation_config.json", lambda d: d.update(eos_token_id=value))
    assert load_generation_config(ckpt)["eos_token_id"] == value
    assert eos_token_ids(ckpt) == expected


def test_eos_falls_back_to_config_then_tokenizer(tiny_llama_dir, tmp_path):
    ckpt = _copy(tiny_llama_dir, tmp_path / "ckpt")
    (ckpt / "generation_config.json").unlink()
    assert load_generation_config(ckpt) == {}
    assert eos_token_ids(ckpt, {"eos_token_id": [5, 6]}) == [5, 6]
    assert eos_token_ids(ckpt, {"eos_token_id": None}) == [EOS_ID]  # the tokenizer's
    with pytest.raises(CheckpointError, match="eos_token_id must be"):
        eos_token_ids(ckpt, {"eos_token_id": "</s>"})


# --- tokenizer --------------------------------------------------------------------------------

def test_tokenizer_round_trips_ascii(tiny_llama_dir, tmp_path):
    tok = load_tokenizer(tiny_llama_dir)
    assert len(tok) <= load_hf_config(tiny_llama_dir)["vocab_size"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS_ID, EOS_ID, 3)
    for text in ["Hello world!", "The quick brown fox, 1969 & 3.14 -- ok?",
                 "  two  spaces\tand a tab\nnew line ~{[(zq)]}", "unseen wordz: Xylophagous"]:
        ids = tok(text)["input_ids"]
        assert ids[0] == BOS_ID
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert load_tokenizer(tmp_path) is None


# --- weights ----------------------------------------------------------------------------------

def test_single_and_sharded_give_identical_tensors(tiny_llama_dir, tiny_sharded_dir):
    assert len(list(tiny_sharded_dir.glob("model-*.safetensors"))) > 1
    single, sharded = dict(iterate_weights(tiny_llama_dir)), dict(iterate_weights(tiny_sharded_dir))
    assert "lm_head.weight" in single and single.keys() == sharded.keys()
    for name, tensor in single.items():
        assert torch.equal(tensor, sharded[name]), name


def test_tied_checkpoint_has_no_lm_head(tiny_llama_tied_dir):
    assert "lm_head.weight" not in dict(iterate_weights(tiny_llama_tied_dir))


def test_index_naming_a_missing_file(tiny_sharded_dir, tmp_path):
    ckpt = _copy(tiny_sharded_dir, tmp_path / "ckpt")
    gone = sorted(ckpt.glob("model-*.safetensors"))[1]
    gone.unlink()
    with pytest.raises(CheckpointError, match=f"{gone.name}: missing"):
        iterate_weights(ckpt)


def test_index_naming_a_tensor_its_shard_lacks(tiny_sharded_dir, tmp_path):
    ckpt = _copy(tiny_sharded_dir, tmp_path / "ckpt")
    shard = min(ckpt.glob("model-*.safetensors")).name
    _edit_json(ckpt / "model.safetensors.index.json",
               lambda d: d["weight_map"].update({"model.ghost.weight": shard}))
    with pytest.raises(CheckpointError, match=f"{shard}.*model.ghost.weight.*does not hold"):
        list(iterate_weights(ckpt))


def test_tensor_in_two_files(tmp_path):
    save_file({"a": torch.zeros(2), "b": torch.ones(2)}, tmp_path / "one.safetensors")
    save_file({"b": torch.ones(2)}, tmp_path / "two.safetensors")
    weight_map = {"a": "one.safetensors", "b": "two.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="'b' is in both"):
        list(iterate_weights(tmp_path))


def test_index_is_trusted_over_stray_files(tiny_sharded_dir, tmp_path):
    ckpt = _copy(tiny_sharded_dir, tmp_path / "ckpt")
    save_file({"other.name": torch.zeros(3)}, ckpt / "consolidated.safetensors")
    names = {name for name, _ in iterate_weights(ckpt)}
    assert "other.name" not in names and "lm_head.weight" in names


@pytest.mark.parametrize("keep", [0.5, 4 / 10**9])
def test_truncated_safetensors(tiny_llama_dir, tmp_path, keep):
    ckpt = _copy(tiny_llama_dir, tmp_path / "ckpt")
    file = ckpt / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: max(4, int(len(data) * keep))])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated or corrupt"):
        list(iterate_weights(ckpt))


def test_corrupt_safetensors_error_is_converted(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [10], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(CheckpointError, match="model.safetensors: truncated or corrupt"):
        list(iterate_weights(tmp_path))


def test_no_weights(tiny_llama_dir, tmp_path):
    (tmp_path / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no weights found"):
        iterate_weights(tmp_path)


def test_bin_loads_with_weights_only_and_safetensors_wins(tmp_path):
    state = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    loaded = dict(iterate_weights(tmp_path))
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    save_file({"a": torch.zeros(2, 3)}, tmp_path / "model.safetensors")
    assert torch.equal(dict(iterate_weights(tmp_path))["a"], torch.zeros(2, 3))


def test_sharded_bin_with_index(tmp_path):
    torch.save({"a": torch.zeros(2)}, tmp_path / "pytorch_model-1.bin")
    torch.save({"b": torch.ones(2)}, tmp_path / "pytorch_model-2.bin")
    weight_map = {"a": "pytorch_model-1.bin", "b": "pytorch_model-2.bin"}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert sorted(name for name, _ in iterate_weights(tmp_path)) == ["a", "b"]


CALLS: list[str] = []


def _record(arg: str) -> str:
    CALLS.append(arg)
    return arg


class Payload:
    """Unpickling this would call _record: weights_only must refuse it first."""

    def __reduce__(self):
        return (_record, ("unpickled",))


def test_bin_with_arbitrary_object_is_refused(tmp_path):
    torch.save({"w": torch.zeros(2), "payload": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: refused.*weights_only"):
        list(iterate_weights(tmp_path))
    assert CALLS == []


def test_truncated_bin(tmp_path):
    torch.save({"w": torch.zeros(1000)}, tmp_path / "pytorch_model.bin")
    data = (tmp_path / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="pytorch_model.bin: truncated or corrupt"):
        list(iterate_weights(tmp_path))


# --- LoadTracker ------------------------------------------------------------------------------

def test_load_tracker_reports_by_name():
    qkv = "layers.0.attn.qkv_proj.weight"
    tracker = LoadTracker(["embed.weight", qkv, "norm.weight", "final_norm.weight", "lm_head.weight"],
                          shards={qkv: ["q", "k", "v"]})
    tracker.loaded("embed.weight", "embed.weight")
    tracker.loaded("layers.0.attn.q_proj.weight", qkv, "q")
    tracker.loaded("layers.0.attn.v_proj.weight", qkv, "v")
    tracker.misshaped("norm.weight", (64,), torch.Size([32]))
    tracker.misshaped("final_norm.weight", (64,), (64, 1), param_name="final_norm.weight")
    tracker.unused("rotary.inv_freq")
    tracker.skip("lm_head.weight")
    report = tracker.report()
    assert report == {
        "missing": [f"{qkv} (shard 'k')", "norm.weight"],
        "unexpected": ["rotary.inv_freq"],
        "misshaped": [{"name": "norm.weight", "expected": [64], "got": [32]},
                      {"name": "final_norm.weight", "expected": [64], "got": [64, 1]}],
    }
    with pytest.raises(CheckpointError) as err:
        tracker.raise_if_errors("TinyLlama")
    message = str(err.value)
    for part in ("TinyLlama", "2 missing", "(shard 'k'), norm.weight", "2 misshaped", "unexpected: rotary.inv_freq",
                 "norm.weight (expected [64], got [32])"):
        assert part in message


def test_load_tracker_clean_and_truncated_lists():
    tracker = LoadTracker([f"p{i}" for i in range(3)])
    for i in range(3):
        tracker.loaded(f"c{i}", f"p{i}")
    tracker.raise_if_errors("ok")  # nothing to report
    many = LoadTracker([f"p{i}" for i in range(50)])
    with pytest.raises(CheckpointError, match=r"\.\.\. and 30 more"):
        many.raise_if_errors("m")


def test_check_loaded_compares_shapes():
    report = check_loaded({"a": (2, 3), "b": (4,), "c": (1,)},
                          {"a": torch.Size([2, 3]), "b": (5,), "d": (1,)})
    assert report.missing == ["c"] and report.unexpected == ["d"]
    assert report.misshaped == [("b", (4,), (5,))]
    assert not report.ok
