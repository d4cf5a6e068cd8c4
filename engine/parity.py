"""Parity: the paged engine against HF transformers (float32) on the same checkpoint.

The engine runs the way it serves: the prompts batched, prefilled (once whole, once in small
chunks), then decoded greedily through the paged KV cache; its logits are taken at every position
(prompt positions through prompt_logprobs rows, decode positions as sampled). HF then runs the
engine's own prompt + output tokens in one forward (teacher forcing), so every position is
compared on the same prefix, and HF `generate` gives the greedy continuation to compare. On
failure, engine/parity_localize.py names the first sub-layer that diverges.

This module runs the check; the report and tolerances are engine/parity_report.py, the tiny
checkpoints engine/parity_tiny.py, the HF side and the comparison engine/parity_compare.py.
"""

from __future__ import annotations

import contextlib
import gc
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from engine.errors import AphroError
from engine.loader import non_strict_loading
from engine.parity_compare import _compare_run, _hf_greedy, _load_hf
from engine.parity_localize import (
    Capture,
    Localization,
    ModuleTracer,
    layer_list_name,
    load_hints,
    localize,
    probe_names,
)
from engine.parity_report import EngineFailure, ParityReport, Tolerances, default_tolerances
from engine.parity_tiny import _checkpoint, _quiet_transformers

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
               localize_always: bool = False,
               progress: Callable[[str], None] | None = None) -> ParityReport:
    """Check the engine against HF on `model`: a local HF checkpoint folder, a spec (a name in
    model_specs/ or a .toml path) or a registered architecture; the last two through a tiny
    random checkpoint in a temporary folder (kept with `keep`). `tolerances` replaces the
    defaults of the dtype and device, or (a dict) overrides some fields. A model that is wrong
    gives a failed report; bad arguments raise AphroError. `progress` gets one line per stage."""
    say = progress or (lambda msg: None)
    if max_new_tokens < 1:
        raise AphroError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    with _checkpoint(model, seed, keep, say) as (ckpt, source), _quiet_transformers():
        plan = _plan(str(model), ckpt, source, dtype, device, prompts, max_new_tokens, seed, tp,
                     tolerances)
        return _check(plan, chunked_prefill, localize_always, keep, say)


@dataclass
class _Plan:
    label: str
    ckpt: Path
    source: str
    hf_config: object
    device: torch.device
    dtype: torch.dtype
    tol: Tolerances
    prompts: list[str]
    prompt_ids: list[list[int]]
    max_new_tokens: int
    seed: int
    tp: int
    max_model_len: int

    @property
    def probe_ids(self) -> list[int]:  # localization's one prefill: the longest prompt
        return max(self.prompt_ids, key=len)


def _plan(label, ckpt, source, dtype, device, prompts, n_new, seed, tp, tolerances) -> _Plan:
    from engine.loader import load_tokenizer
    from engine.worker import load_config, resolve_device, resolve_dtype

    hf_config = load_config(ckpt)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, hf_config, dev)
    tol = default_tolerances(torch_dtype, dev)
    if isinstance(tolerances, Tolerances):
        tol = tolerances
    elif tolerances:
        tol = replace(tol, **{k: v for k, v in tolerances.items() if v is not None})
    prompts = list(prompts or DEFAULT_PROMPTS)
    prompt_ids = _encode(prompts, load_tokenizer(ckpt), hf_config, seed)
    max_pos = (getattr(hf_config, "max_position_embeddings", None)
               or getattr(hf_config, "n_positions", None) or 2048)
    longest = max(len(p) for p in prompt_ids)
    if longest + n_new + 1 > max_pos:
        raise AphroError(f"the longest prompt ({longest} tokens) plus {n_new} new tokens "
                         f"exceeds the model's context ({max_pos}): shorten the prompts or "
                         "lower --max-new-tokens")
    return _Plan(label, ckpt, source, hf_config, dev, torch_dtype, tol, prompts, prompt_ids,
                 n_new, seed, tp, longest + n_new + 1)


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


def _check(plan: _Plan, chunked: bool, localize_always: bool, keep: bool,
           say) -> ParityReport:
    report = ParityReport(
        model=plan.label, source=plan.source,
        checkpoint=str(plan.ckpt) if keep or plan.source == "checkpoint" else None,
        architecture=(getattr(plan.hf_config, "architectures", None) or ["?"])[0],
        dtype=str(plan.dtype).removeprefix("torch."), device=str(plan.device), tp=plan.tp,
        max_new_tokens=plan.max_new_tokens, tolerances=plan.tol)
    runs = []
    for name, chunk in [("batched", None)] + ([("chunked", CHUNK_TOKENS)] if chunked else []):
        say(f"{plan.label}: engine, {name} prefill + {plan.max_new_tokens} decode steps")
        try:
            run = _run_engine(plan, plan.prompt_ids, plan.max_new_tokens, chunk, plan.tp,
                              probe=name == "batched")
        except Exception as e:  # noqa: BLE001 - a model that cannot run is a failed check
            report.failure = _failure(f"engine ({name} run)", e)
            return report
        report.load = report.load or run.load
        runs.append((name, chunk, run))
    report.load_hints = load_hints(report.load)

    say(f"{plan.label}: HF transformers reference (float32)")
    hf = _load_hf(plan.ckpt, plan.device)
    try:
        hf_tokens = [_hf_greedy(hf, ids, plan.max_new_tokens, plan.device)
                     for ids in plan.prompt_ids]
        report.runs = [_compare_run(name, chunk, run, hf, hf_tokens, plan)
                       for name, chunk, run in runs]
        if not report.passed or localize_always:
            say(f"{plan.label}: localizing")
            report.localization = _localize(hf, runs[0][2], plan)
    finally:
        del hf
        _free()
    return report


def _failure(stage: str, e: Exception) -> EngineFailure:
    where = getattr(e, "parity_module", None)
    if where is None:
        frames = [f for f in traceback.extract_tb(e.__traceback__)
                  if "/engine/" in f.filename or "/kernels/" in f.filename]
        if frames:
            where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}"
    msg = str(e).strip().splitlines()
    return EngineFailure(stage, f"{type(e).__name__}: {msg[0] if msg else ''}", where)


# -- the engine side ----------------------------------------------------------------------------

@dataclass
class _EngineRun:
    tokens: list[list[int]]
    logits: list[dict[int, torch.Tensor]]  # per prompt: position -> logits [vocab] float32 CPU
    load: dict
    probe: Capture | None = None  # hidden states of one prefill of plan.probe_ids


def _run_engine(plan: _Plan, prompt_ids: list[list[int]], n_new: int, chunk: int | None,
                tp: int, probe: bool) -> _EngineRun:
    """The prompts batched through a fresh LLM, greedy, logits kept at every position; with
    `probe`, then one more prefill with hooks on every sub-layer (rank 0's model)."""
    from engine import LLM, SamplingParams

    block = 16
    blocks = sum(-(-(len(p) + n_new + 1) // block) for p in prompt_ids)
    blocks += -(-plan.max_model_len // block) + 4
    with non_strict_loading():
        llm = LLM(str(plan.ckpt), dtype=plan.dtype, device=str(plan.device),
                  max_model_len=plan.max_model_len, block_size=block,
                  max_num_seqs=len(prompt_ids), max_num_batched_tokens=chunk,
                  enable_chunked_prefill=chunk is not None, num_kv_blocks=blocks,
                  seed=plan.seed, tensor_parallel_size=tp)
    try:
        engine, worker = llm.engine, llm.engine.worker
        model = getattr(worker, "model", None)
        load = worker.load_report.report() if hasattr(worker.load_report, "report") else {}
        captured: dict[str, dict[int, torch.Tensor]] = {}
        _capture_logits(worker, captured)
        params = SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True,
                                prompt_logprobs=0)  # prompt logits too; no prefix-cache hits
        rids = [engine.add_request(None, params, ids, request_id=f"parity-{i}")
                for i, ids in enumerate(prompt_ids)]
        tokens: dict[str, list[int]] = {}
        with _traced(model):
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        tokens[out.request_id] = list(out.outputs[0].token_ids)
        run = _EngineRun([tokens[r] for r in rids], [captured.get(r, {}) for r in rids], load)
        if probe and model is not None:
            layers = layer_list_name(model, getattr(model, "num_layers", None))
            one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, prompt_logprobs=0)
            with Capture(model, probe_names(model, layers) if layers else [], layers,
                         ours=True) as run.probe, _traced(model):
                engine.add_request(None, one, plan.probe_ids, request_id="parity-probe")
                while engine.has_unfinished_requests():
                    engine.step()
        return run
    finally:
        close = getattr(llm.engine, "close", None)
        if close is not None:
            close()
        del llm
        _free()


@contextlib.contextmanager
def _traced(model):
    """Name the innermost module on an exception raised in a forward (as `parity_module`)."""
    if model is None:
        yield
        return
    tracer = ModuleTracer(model)
    try:
        with tracer:
            yield
    except Exception as e:
        e.parity_module = tracer.failed_in
        raise


def _capture_logits(worker, captured: dict[str, dict[int, torch.Tensor]]) -> None:
    """Wrap worker.execute: keep the logits of every row it returns, by (request, position).
    Prompt positions come as prompt_logprobs rows, the last computed one as the sampled row."""
    execute = worker.execute

    def wrapped(inp):
        logits, prompt_logits = execute(inp)
        for seq, row in zip(inp.sample_seqs, logits):
            captured.setdefault(seq.request_id, {})[len(seq) - 1] = row.float().cpu()
        for (seq, first_pos, _), rows in zip(inp.prompt_logprob_rows, prompt_logits):
            d = captured.setdefault(seq.request_id, {})
            for i, row in enumerate(rows.float().cpu()):
                d[first_pos - 1 + i] = row
        return logits, prompt_logits

    worker.execute = wrapped


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _localize(hf, run: _EngineRun, plan: _Plan) -> Localization | None:
    """Hidden states of one prefill of the longest prompt, on both sides."""
    if run.probe is None:  # rank 0's model was not in this process: localize at TP=1
        run = _run_engine(plan, [plan.probe_ids], 1, None, 1, probe=True)
    text = plan.hf_config.get_text_config()
    layers = layer_list_name(hf, getattr(text, "num_hidden_layers", None))
    if layers is None or run.probe is None:
        return None
    with Capture(hf, probe_names(hf, layers), layers, ours=False) as cap, torch.no_grad():
        hf(torch.tensor([plan.probe_ids], device=plan.device))
    return localize(cap, run.probe, layers, len(plan.probe_ids), plan.tol.localize_rtol)
