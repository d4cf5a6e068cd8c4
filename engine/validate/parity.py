"""Parity: the paged engine against HF transformers (float32) on the same checkpoint.

The engine runs the way it serves: the prompts batched, prefilled (once whole, once in small
chunks), then decoded greedily through the paged KV cache; its logits are taken at every position
(prompt positions through prompt_logprobs rows, decode positions as sampled). HF then runs the
engine's own prompt + output tokens in one forward (teacher forcing), so every position is
compared on the same prefix, and HF `generate` gives the greedy continuation to compare. On
failure, engine/validate/localize.py names the first sub-layer that diverges.

The engine is seen only through the model runner's observer hook (engine.runner.observer):
the logits of every row it computed, and for localization the outputs of the probe points.
This module runs the check; the report, plan and tolerances are report.py, the tiny checkpoints
tiny.py, the HF side and the comparison compare.py, localization localize.py.
"""

from __future__ import annotations

import gc
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from engine.checkpoint.report import non_strict_loading
from engine.errors import AphroError, CheckpointError, ModelNotSupportedError
from engine.runner.observer import Capture, ObserveSpec, probe_names
from engine.validate.compare import compare_run, hf_greedy, load_hf
from engine.validate.localize import (
    Localization,
    layer_list_name,
    load_hints,
    load_summary,
    localize,
)
from engine.validate.report import (
    CheckPlan,
    EngineFailure,
    EngineRun,
    ParityReport,
    Tolerances,
    default_tolerances,
)
from engine.validate.tiny import quiet_transformers, tiny_or_folder

DEFAULT_PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    ("A paged attention engine keeps the key and value cache in fixed-size blocks, and the "
     "scheduler decides which sequences run in the next step."),
    ("Please write a short poem about the moon, the stars and the sea. Rain fell on the old "
     "stone bridge while the river rose slowly, and birds sang in the garden as the first light "
     "reached the trees beyond the quiet valley."),
]
CHUNK_TOKENS = 7  # the chunked run's step budget: chunks end mid-block and mix with decodes


# -- the whole check ----------------------------------------------------------------------------

def run_parity(model: str | Path, *, dtype: str = "auto", device: str = "auto",
               prompts: list[str] | None = None, max_new_tokens: int = 16, seed: int = 0,
               tp: int = 1, chunked_prefill: bool = True,
               tolerances: Tolerances | dict | None = None, keep: bool = False,
               localize_always: bool = False, quantization: str | None = None,
               kv_cache_dtype: str = "auto",
               progress: Callable[[str], None] | None = None) -> ParityReport:
    """Check the engine against HF on `model`: a local HF checkpoint folder, a spec (a name in
    model_specs/ or a .toml path) or a registered architecture; the last two through a tiny
    random checkpoint in a temporary folder (kept with `keep`). `tolerances` replaces the
    defaults of the dtype and device, or (a dict) overrides some fields. With `quantization`
    the engine quantizes the checkpoint at load time (HF stays at full precision) and the
    defaults are that scheme's (report.QUANTIZED_TOLERANCES), as they are with an FP8
    `kv_cache_dtype`. A model that is wrong gives a
    failed report; bad arguments raise AphroError. `progress` gets one line per stage."""
    say = progress or (lambda msg: None)
    if max_new_tokens < 1:
        raise AphroError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    with tiny_or_folder(model, seed, keep, say) as (ckpt, source), quiet_transformers():
        plan = _plan(str(model), ckpt, source, dtype, device, prompts, max_new_tokens, seed, tp,
                     tolerances, quantization, kv_cache_dtype)
        report = _check(plan, chunked_prefill, localize_always, keep, say)
    report.warnings += stale_module_warnings(plan.hf_config)
    return report


def stale_module_warnings(hf_config) -> list[str]:
    """A warning when the module that serves the checked architecture was generated from a
    spec that has changed since (the check ran the module as it is, not the spec)."""
    from engine.models import registry
    from engine.models.sources import module_source
    from engine.spec.generator import out_of_date

    archs = getattr(hf_config, "architectures", None) or []
    try:
        target = registry.resolve_class_path(archs)
    except AphroError:
        return []
    if not isinstance(target, str) or ":" not in target:
        return []
    module, spec = module_source(target)
    why = out_of_date(module) if module is not None else None
    if why is None:
        return []
    return [(f"{module} is out of date: {why}; this check ran the module as it is. "
             f"Regenerate it: aphro new-model {spec}")]


def _plan(label, ckpt, source, dtype, device, prompts, n_new, seed, tp, tolerances,
          quantization=None, kv_cache_dtype="auto") -> CheckPlan:
    from engine.checkpoint.files import load_tokenizer
    from engine.config import (
        KV_CACHE_DTYPES,
        load_config,
        model_max_len,
        resolve_device,
        resolve_dtype,
    )
    from engine.layers.quantization import checkpoint_quantization, resolve_quantization

    hf_config = load_config(ckpt)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, hf_config, dev)
    if checkpoint_quantization(hf_config) is not None:
        raise AphroError(f"{ckpt}: the checkpoint is already quantized (config.json "
                         "quantization_config) and HF cannot run it at full precision here: "
                         "check the full-precision checkpoint with --quantization instead")
    quant = resolve_quantization(quantization, hf_config, dev).name
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise AphroError(f"kv_cache_dtype={kv_cache_dtype!r}: one of {', '.join(KV_CACHE_DTYPES)}")
    tol = default_tolerances(torch_dtype, dev, quant, kv_cache_dtype)
    if isinstance(tolerances, Tolerances):
        tol = tolerances
    elif tolerances:
        tol = replace(tol, **{k: v for k, v in tolerances.items() if v is not None})
    prompts = list(prompts or DEFAULT_PROMPTS)
    prompt_ids = _encode(prompts, load_tokenizer(ckpt), hf_config, seed)
    max_pos = model_max_len(hf_config)
    longest = max(len(p) for p in prompt_ids)
    if longest + n_new + 1 > max_pos:
        raise AphroError(f"the longest prompt ({longest} tokens) plus {n_new} new tokens "
                         f"exceeds the model's context ({max_pos}): shorten the prompts or "
                         "lower --max-new-tokens")
    return CheckPlan(label, ckpt, source, hf_config, dev, torch_dtype, tol, prompts, prompt_ids,
                     n_new, seed, tp, longest + n_new + 1, None if quant == "none" else quant,
                     kv_cache_dtype)


def _encode(prompts: list[str], tokenizer, hf_config, seed: int) -> list[list[int]]:
    """Token ids per prompt; without a tokenizer, seeded random ids of a similar length."""
    if tokenizer is not None:
        ids = [list(tokenizer.encode(p)) for p in prompts]
    else:
        vocab = hf_config.get_text_config().vocab_size
        gen = torch.Generator().manual_seed(seed)
        ids = [torch.randint(0, vocab, (max(1, len(p.split())),), generator=gen).tolist()
               for p in prompts]
    empty = [i for i, p in enumerate(ids) if not p]
    if empty:
        raise AphroError(f"prompt {empty[0] + 1} encodes to no tokens")
    return ids


def _check(plan: CheckPlan, chunked: bool, localize_always: bool, keep: bool,
           say) -> ParityReport:
    report = ParityReport(
        model=plan.label, source=plan.source,
        checkpoint=str(plan.ckpt) if keep or plan.source == "checkpoint" else None,
        architecture=(getattr(plan.hf_config, "architectures", None) or ["?"])[0],
        dtype=str(plan.dtype).removeprefix("torch."), device=str(plan.device), tp=plan.tp,
        max_new_tokens=plan.max_new_tokens, tolerances=plan.tol,
        quantization=plan.quantization or "none", kv_cache_dtype=plan.kv_cache_dtype)
    runs = []
    for name, chunk in [("batched", None)] + ([("chunked", CHUNK_TOKENS)] if chunked else []):
        say(f"{plan.label}: engine, {name} prefill + {plan.max_new_tokens} decode steps")
        try:
            run = _run_engine(plan, plan.prompt_ids, plan.max_new_tokens, chunk, plan.tp,
                              probe=name == "batched")
        except (ModelNotSupportedError, CheckpointError):
            raise  # an unknown architecture, a truncated or missing file: the user's to fix
        except Exception as e:  # noqa: BLE001 - a model that cannot run is a failed check
            report.failure = _failure(f"engine ({name} run)", e)
            return report
        if report.load is None:
            report.load = run.load
        runs.append((name, chunk, run))
    report.load_hints = load_hints(report.load or {})

    say(f"{plan.label}: HF transformers reference (float32)")
    try:
        hf = load_hf(plan.ckpt, plan.device)
    except AphroError as e:
        if report.load is None or report.load_ok:
            raise
        # the checkpoint disagrees with its own config: say which tensors, then HF's word
        raise CheckpointError(f"{plan.ckpt}: the checkpoint does not match its config.json "
                              f"({load_summary(report.load)}); transformers cannot load it "
                              f"either: {str(e).splitlines()[0]}") from None
    try:
        hf_tokens = [hf_greedy(hf, ids, plan.max_new_tokens, plan.device)
                     for ids in plan.prompt_ids]
        report.runs = [compare_run(name, chunk, run, hf, hf_tokens, plan)
                       for name, chunk, run in runs]
        if not report.passed or localize_always:
            say(f"{plan.label}: localizing")
            report.localization = _localize(hf, runs[0][2], plan)
    finally:
        del hf
        _free()
    return report


def _failure(stage: str, e: Exception) -> EngineFailure:
    where = getattr(e, "failed_module", None)
    if where is None:
        frames = [f for f in traceback.extract_tb(e.__traceback__)
                  if "/engine/" in f.filename or "/kernels/" in f.filename]
        if frames:
            where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}"
    msg = str(e).strip().splitlines()
    return EngineFailure(stage, f"{type(e).__name__}: {msg[0] if msg else ''}", where)


# -- the engine side ----------------------------------------------------------------------------

def _run_engine(plan: CheckPlan, prompt_ids: list[list[int]], n_new: int, chunk: int | None,
                tp: int, probe: bool) -> EngineRun:
    """The prompts batched through a fresh LLM, greedy, logits kept at every position; with
    `probe`, then one more prefill with the probe points observed (rank 0's model)."""
    from engine import LLM, SamplingParams

    block = 16
    blocks = sum(-(-(len(p) + n_new + 1) // block) for p in prompt_ids)
    blocks += -(-plan.max_model_len // block) + 4
    with non_strict_loading():
        llm = LLM(str(plan.ckpt), dtype=plan.dtype, device=str(plan.device),
                  max_model_len=plan.max_model_len, block_size=block,
                  max_num_seqs=len(prompt_ids), max_num_batched_tokens=chunk,
                  enable_chunked_prefill=chunk is not None, num_kv_blocks=blocks,
                  seed=plan.seed, tensor_parallel_size=tp, quantization=plan.quantization,
                  kv_cache_dtype=plan.kv_cache_dtype)
    try:
        engine = llm.engine
        engine.observe(ObserveSpec(logits=True, trace_errors=tp == 1))
        params = SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True,
                                prompt_logprobs=0)  # prompt logits too; no prefix-cache hits
        rids = [engine.add_request(None, params, ids, request_id=f"parity-{i}")
                for i, ids in enumerate(prompt_ids)]
        seq_ids = [engine.requests[r].seqs[0].seq_id for r in rids]
        tokens: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    tokens[out.request_id] = list(out.outputs[0].token_ids)
        seen = engine.take_observations().logits
        logits = [{pos: row for (sid, pos), row in seen.items() if sid == seq_id}
                  for seq_id in seq_ids]
        run = EngineRun([tokens[r] for r in rids], logits, engine.load_report)
        if probe and tp == 1:
            engine.observe(ObserveSpec(probe=True, trace_errors=True))
            one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, prompt_logprobs=0)
            engine.add_request(None, one, plan.probe_ids, request_id="parity-probe")
            while engine.has_unfinished_requests():
                engine.step()
            run.probe = engine.take_observations()
        return run
    finally:
        llm.close()
        del llm
        _free()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _localize(hf, run: EngineRun, plan: CheckPlan) -> Localization | None:
    """Hidden states of one prefill of the longest prompt, on both sides."""
    if run.probe is None:  # observed at TP=1 only: localize there
        run = _run_engine(plan, [plan.probe_ids], 1, None, 1, probe=True)
    text = plan.hf_config.get_text_config()
    layers = layer_list_name(hf, getattr(text, "num_hidden_layers", None))
    if layers is None or run.probe is None:
        return None
    with Capture(hf, probe_names(hf, layers), layers, ours=False) as cap, torch.no_grad():
        hf(torch.tensor([plan.probe_ids], device=plan.device))
    return localize(cap, run.probe, layers, len(plan.probe_ids), plan.tol.localize_rtol)
