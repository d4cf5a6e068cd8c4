"""Read a local Hugging Face checkpoint folder: config, generation config, tokenizer, weights.

Never runs code from the checkpoint: `auto_map` is ignored, `trust_remote_code` is always False,
and `.bin` files are only read through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint.report import name_list
from engine.errors import CheckpointError

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json",
                   "vocab.txt", "spiece.model")
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors itself refuses headers above 100 MB


def _folder(path: str | os.PathLike) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder (no such directory); "
                              "pass the path of a local Hugging Face model folder")
    return folder


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: cannot be read: {e}") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: invalid JSON at line {e.lineno} column {e.colno}: "
                              f"{e.msg}; fix or re-download the file") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def load_hf_config(path: str | os.PathLike) -> dict:
    """config.json as a dict. `auto_map` is kept as data but never imported."""
    file = _folder(path) / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; a checkpoint folder needs the model's config.json")
    return _read_json(file)


def load_generation_config(path: str | os.PathLike) -> dict:
    """generation_config.json as a dict, or {} when the folder has none."""
    file = _folder(path) / GENERATION_CONFIG_FILE
    return _read_json(file) if file.is_file() else {}


def _as_id_list(value: Any, where: str) -> list[int] | None:
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise CheckpointError(f"{where}: eos_token_id must be an int or a list of ints, "
                              f"got {value!r}")
    return list(dict.fromkeys(values))


def eos_token_ids(path: str | os.PathLike, hf_config: dict | None = None) -> list[int]:
    """End-of-sequence ids: generation_config.json's, else config.json's, else the tokenizer's."""
    folder = _folder(path)
    ids = _as_id_list(load_generation_config(folder).get("eos_token_id"),
                      str(folder / GENERATION_CONFIG_FILE))
    if ids is not None:
        return ids
    if hf_config is None:
        hf_config = load_hf_config(folder)
    ids = _as_id_list(hf_config.get("eos_token_id"), str(folder / CONFIG_FILE))
    if ids is not None:
        return ids
    tokenizer = load_tokenizer(folder)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        return [int(tokenizer.eos_token_id)]
    return []


def load_tokenizer(path: str | os.PathLike):
    """The folder's tokenizer through AutoTokenizer (local files only), or None if it has none."""
    folder = _folder(path)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                             trust_remote_code=False)
    except Exception as e:  # transformers raises many types; the user needs one message
        raise CheckpointError(f"{folder}: tokenizer cannot be loaded without remote code or "
                              f"network: {type(e).__name__}: {e}") from e


# ---------------------------------------------------------------------------------------------
# weights


def _safetensors_header(file: Path) -> dict:
    """The header of a safetensors file, checked against the file size."""
    bad = f"{file}: truncated or corrupt safetensors file"
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{bad} ({size} bytes, shorter than its 8-byte header "
                                      "length); re-download it")
            (n,) = struct.unpack("<Q", prefix)
            if n > _MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(f"{bad} (header says {n} bytes, file has {size}); "
                                      "re-download it")
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"{file}: cannot be read: {e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{bad} (header is not JSON); re-download it") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{bad} (header is not a JSON object); re-download it")
    data_bytes = size - 8 - n
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise CheckpointError(f"{bad} (tensor {name!r} has no data_offsets); re-download it")
        end = max(end, offsets[1])
    if end > data_bytes:
        raise CheckpointError(f"{bad} (tensors need {end} data bytes, file has {data_bytes}); "
                              "re-download it")
    return header


def _read_index(folder: Path, index: Path) -> dict[str, list[str]]:
    """file name -> the tensor names the index puts in it, in index order."""
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: has no 'weight_map' object naming tensors and files")
    files: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        if not isinstance(file, str) or Path(file).name != file:
            raise CheckpointError(f"{index}: tensor {name!r} maps to {file!r}; expected a file "
                                  "name inside the checkpoint folder")
        files.setdefault(file, []).append(name)
    for file, names in files.items():
        if not (folder / file).is_file():
            raise CheckpointError(f"{folder / file}: missing, but {index.name} names it for "
                                  f"{len(names)} tensors; re-download the checkpoint")
    return files


def _weight_plan(folder: Path) -> tuple[str, dict[str, list[str] | None]]:
    """("safetensors" | "bin", file name -> tensor names to read, or None for all of them)."""
    if (folder / SAFETENSORS_INDEX).is_file():
        return "safetensors", _read_index(folder, folder / SAFETENSORS_INDEX)
    if (folder / SAFETENSORS_FILE).is_file():
        return "safetensors", {SAFETENSORS_FILE: None}
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    if shards:
        return "safetensors", dict.fromkeys(shards)
    if (folder / BIN_INDEX).is_file():
        return "bin", _read_index(folder, folder / BIN_INDEX)
    if (folder / BIN_FILE).is_file():
        return "bin", {BIN_FILE: None}
    raise CheckpointError(f"{folder}: no weights found (looked for {SAFETENSORS_INDEX}, "
                          f"{SAFETENSORS_FILE}, *.safetensors, {BIN_INDEX}, {BIN_FILE})")


def _check_names(file: Path, wanted: list[str] | None, present: list[str],
                 seen: dict[str, Path]) -> list[str]:
    for name in present:
        if name in seen:
            raise CheckpointError(f"tensor {name!r} is in both {seen[name]} and {file}; "
                                  "a checkpoint must hold each tensor once")
        seen[name] = file
    if wanted is None:
        return present
    missing = sorted(set(wanted) - set(present))
    if missing:
        raise CheckpointError(f"{file}: the index puts {name_list(missing, 5)} in this file, "
                              "but it does not hold them; re-download the checkpoint")
    return wanted


def _iterate_safetensors(folder: Path, plan: dict[str, list[str] | None]) -> Iterator[
        tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    seen: dict[str, Path] = {}
    names = {}
    for file, wanted in plan.items():  # check every header before yielding anything
        header = _safetensors_header(folder / file)
        present = [k for k in header if k != "__metadata__"]
        names[file] = _check_names(folder / file, wanted, present, seen)
    for file, wanted in names.items():
        try:
            with safe_open(folder / file, framework="pt", device="cpu") as f:
                for name in wanted:
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{folder / file}: truncated or corrupt safetensors file "
                                  f"({e}); re-download it") from e


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(file, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{file}: refused: it holds more than plain tensors and aphro only "
                              f"loads .bin files with torch.load(weights_only=True) ({first}); "
                              "convert the checkpoint to safetensors") from e
    except Exception as e:  # zip / EOF / runtime errors of a damaged file
        raise CheckpointError(f"{file}: truncated or corrupt .bin file "
                              f"({type(e).__name__}: {e}); re-download it") from e
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{file}: expected a dict of tensor names to tensors")
    return dict(state)


def _iterate_bin(folder: Path, plan: dict[str, list[str] | None]) -> Iterator[
        tuple[str, torch.Tensor]]:
    seen: dict[str, Path] = {}
    for file, wanted in plan.items():
        state = _load_bin(folder / file)
        for name in _check_names(folder / file, wanted, list(state), seen):
            yield name, state[name]
        del state


def iterate_weights(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, CPU tensor) for every tensor of the checkpoint; safetensors preferred.

    With an index, the index is trusted: only the files it names are read (other *.safetensors
    files in the folder, such as consolidated.safetensors, are ignored), each must exist and hold
    the tensors the index puts in it; tensors a file holds beyond those are not read. A tensor
    held by two files is an error. Files are checked before the first tensor is yielded.
    """
    folder = _folder(path)
    kind, plan = _weight_plan(folder)
    if kind == "safetensors":
        return _iterate_safetensors(folder, plan)
    return _iterate_bin(folder, plan)
