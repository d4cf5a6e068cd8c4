"""Parity: the paged engine against HF transformers (float32) on the same checkpoint.

The engine runs the way it serves: the prompts batched, prefilled (once whole, once in small
chunks), then decoded greedily through the paged KV cache; its logits are taken at every position
(prompt positions through prompt_logprobs rows, decode positions as sampled). HF then runs the
engine's own prompt + output tokens in one forward (teacher forcing), so every position is
compared on the same prefix, and HF `generate` gives the greedy continuation to compare. On
failure, engine/parity_localize.py names the first sub-layer that diverges.
"""

from __future__ import annotations

import contextlib
import gc
import math
import shutil
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from engine.errors import AphroError
from engine.loader import non_strict_loading
from engine.parity_localize import (
    Capture,
    Localization,
    ModuleTracer,
    layer_list_name,
    load_hints,
    localize,
    probe_names,
)

DEFAULT_PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    ("A paged attention engine keeps the key and value cache in fixed-size blocks, and the "
     "scheduler decides which sequences run in the next step."),
    ("Please write a short poem about the moon, the stars and the sea. Rain fell on the old "
     "stone bridge while the river rose slowly, and birds sang in the garden as the first light "
     "reached the trees beyond the quiet valley."),
]
SPECS_DIR = Path(__file__).resolve().parent.parent / "model_specs"
CHUNK_TOKENS = 7  # the chunked run's step budget: chunks end mid-block and mix with decodes

# generic tiny config for a registered architecture that has no spec (HF field names; configs
# map them through attribute_map where theirs differ)
TINY_FIELDS = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 512,
               "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


@dataclass(frozen=True)
class Tolerances:
    """A position is within tolerance when max|engine - HF| <= atol + rtol * max|HF logit| and
    KL(HF||engine) <= kl. In reduced precision a share `outliers` of a run's positions may fall
    outside (a discrete flip: MoE routing or a near-tie, which HF itself shows in that dtype) if
    at each one both argmaxes stay in the other side's top 5. Greedy "exact": continuations
    equal, except at a tie (the two tokens' HF logits within the logit tolerance); "top5"
    (vLLM's rule): where they first differ, each side's token is in the other's top 5.
    Localization counts a point as diverged above relative error `localize_rtol`."""
    atol: float
    rtol: float
    kl: float
    greedy: str
    outliers: float
    localize_rtol: float


# (dtype, device type) -> defaults, measured in docs/VALIDATION.md. On CUDA, float32 engine
# kernels run their dot products in TF32 (Triton's default): ~1e-3 relative.
TOLERANCES = {
    ("float32", "cpu"): Tolerances(1e-4, 1e-5, 1e-6, "exact", 0.0, 1e-4),
    ("float32", "cuda"): Tolerances(1e-2, 5e-3, 2e-4, "exact", 0.0, 1e-2),
    ("bfloat16", "cuda"): Tolerances(0.1, 0.06, 0.05, "top5", 0.02, 0.1),
    ("float16", "cuda"): Tolerances(0.02, 0.01, 5e-3, "top5", 0.01, 0.02),
}


def default_tolerances(dtype: torch.dtype, device: str | torch.device) -> Tolerances:
    name, kind = str(dtype).removeprefix("torch."), torch.device(device).type
    return TOLERANCES.get((name, kind)) or TOLERANCES[(name, "cuda")]


@dataclass
class PromptResult:
    index: int
    prompt: str | None
    num_prompt_tokens: int
    num_positions: int  # positions compared: the prompt's and every decode step's
    max_abs: float
    max_rel: float  # max_abs / max |HF logit|, at the worst position
    top1_agreement: float  # share of positions whose argmax agrees
    max_kl: float
    mean_kl: float
    worst_position: int
    outliers: list[int]  # positions outside the logit / KL tolerance
    logits_ok: bool  # no outliers, or only those the run may excuse
    engine_tokens: list[int]
    hf_tokens: list[int]
    first_mismatch: int | None  # index into the continuation; None when equal
    greedy_ok: bool
    greedy_note: str
    per_position: dict[str, list] = field(default_factory=dict)  # max_abs, rel, kl, top1

    @property
    def passed(self) -> bool:
        return self.logits_ok and self.greedy_ok


@dataclass
class RunResult:
    name: str  # "batched" | "chunked"
    max_num_batched_tokens: int | None
    prompts: list[PromptResult]

    @property
    def passed(self) -> bool:
        return all(p.passed for p in self.prompts)


@dataclass
class EngineFailure:
    stage: str
    error: str  # "Type: message"
    module: str | None  # innermost module running when it raised, or file:line


@dataclass
class ParityReport:
    model: str
    source: str  # "tiny" (built from a config) | "checkpoint"
    checkpoint: str | None  # the folder, or None for a tiny one that was removed
    architecture: str
    dtype: str
    device: str
    tp: int
    max_new_tokens: int
    tolerances: Tolerances
    load: dict = field(default_factory=dict)  # {"missing", "unexpected", "misshaped"}
    load_hints: list[str] = field(default_factory=list)
    runs: list[RunResult] = field(default_factory=list)
    failure: EngineFailure | None = None
    localization: Localization | None = None

    @property
    def load_ok(self) -> bool:
        return not any(self.load.get(k) for k in ("missing", "unexpected", "misshaped"))

    @property
    def passed(self) -> bool:
        return (self.load_ok and self.failure is None and bool(self.runs)
                and all(r.passed for r in self.runs))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"], d["load_ok"] = self.passed, self.load_ok
        for run, r in zip(d["runs"], self.runs):
            run["passed"] = r.passed
            for p, pr in zip(run["prompts"], r.prompts):
                p["passed"] = pr.passed
        return _finite(d)


def _finite(x):
    """NaN and inf become None so the JSON is standard."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


# -- what MODEL names --------------------------------------------------------------------------

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


# -- the HF side and the comparison -------------------------------------------------------------

def _load_hf(ckpt: Path, device: torch.device):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(ckpt), dtype=torch.float32, attn_implementation="eager", local_files_only=True,
            trust_remote_code=False)
    except Exception as e:  # the reference itself cannot run: nothing to compare against
        raise AphroError(f"{ckpt}: transformers cannot load the reference model: "
                         f"{type(e).__name__}: {e}") from e
    return model.to(device).eval()


@torch.no_grad()
def _hf_greedy(hf, ids: list[int], n: int, device: torch.device) -> list[int]:
    """HF generate, greedy, exactly n tokens: none of the checkpoint's generation-config
    processors, no stop at EOS (the engine runs with ignore_eos)."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=n, eos_token_id=[],
                           pad_token_id=0)
    x = torch.tensor([ids], device=device)
    out = hf.generate(x, attention_mask=torch.ones_like(x), generation_config=cfg)
    return out[0, len(ids):].tolist()


@torch.no_grad()
def _hf_logits(hf, ids: list[int], device: torch.device) -> torch.Tensor:
    """Reference logits [len(ids), vocab] float32 on the CPU, one forward."""
    vocab = hf.config.get_text_config().vocab_size
    return hf(torch.tensor([ids], device=device)).logits[0, :, :vocab].float().cpu()


def _compare_run(name: str, chunk: int | None, run: _EngineRun, hf, hf_tokens, plan: _Plan):
    """Teacher-forced: HF runs each prompt + the engine's own output in one forward."""
    results, excusable = [], []
    for i, (ids, out) in enumerate(zip(plan.prompt_ids, run.tokens)):
        ref = _hf_logits(hf, ids + out[:-1], plan.device)
        result, ok = _compare_prompt(i, plan.prompts[i], ids, out, run.logits[i], ref,
                                     hf_tokens[i], plan.tol)
        results.append(result)
        excusable.append(ok)
    total = sum(p.num_positions for p in results)
    excused = (sum(len(p.outliers) for p in results) <= int(plan.tol.outliers * total)
               and all(excusable))
    for p in results:
        p.logits_ok = not p.outliers or excused
    return RunResult(name, chunk, results)


def _compare_prompt(index: int, prompt: str | None, ids: list[int], out: list[int],
                    engine_logits: dict[int, torch.Tensor], ref: torch.Tensor,
                    hf_tokens: list[int], tol: Tolerances) -> tuple[PromptResult, bool]:
    """`ref`: HF logits at positions 0 .. len(ids) + len(out) - 2 on the engine's tokens.
    Also returns whether its outliers could be excused (each keeps top-5 agreement)."""
    n_pos = ref.shape[0]
    missing = [p for p in range(n_pos) if p not in engine_logits]
    ours = torch.stack([engine_logits.get(p, torch.full_like(ref[0], float("nan")))
                        for p in range(n_pos)])[:, : ref.shape[1]]
    max_abs = (ours - ref).abs().amax(-1)
    scale = ref.abs().amax(-1)
    rel = max_abs / scale.clamp_min(1e-30)
    lp_ref, lp_ours = torch.log_softmax(ref.double(), -1), torch.log_softmax(ours.double(), -1)
    kl = (lp_ref.exp() * (lp_ref - lp_ours)).sum(-1)
    top1 = ref.argmax(-1) == ours.argmax(-1)
    ok = (max_abs <= tol.atol + tol.rtol * scale) & (kl <= tol.kl)  # NaN: not ok
    outliers = [int(p) for p in (~ok).nonzero().flatten()]
    k = min(5, ref.shape[1])
    excusable = not missing and all(
        int(ref[p].argmax()) in ours[p].topk(k).indices.tolist()
        and int(ours[p].argmax()) in ref[p].topk(k).indices.tolist() for p in outliers)

    first = next((i for i, (a, b) in enumerate(zip(out, hf_tokens)) if a != b), None)
    if first is None and len(out) != len(hf_tokens):
        first = min(len(out), len(hf_tokens))
    greedy_ok, note = _judge_greedy(first, out, hf_tokens, ours, ref, len(ids), tol)
    if missing:
        note = f"engine returned no logits at positions {missing[:8]}; " + note
    result = PromptResult(
        index=index, prompt=prompt, num_prompt_tokens=len(ids), num_positions=n_pos,
        max_abs=max_abs.max().item(), max_rel=rel.max().item(),
        top1_agreement=top1.float().mean().item(), max_kl=kl.max().item(),
        mean_kl=kl.mean().item(),
        worst_position=int(torch.nan_to_num(max_abs, nan=float("inf")).argmax()),
        outliers=outliers, logits_ok=not outliers, engine_tokens=out, hf_tokens=hf_tokens,
        first_mismatch=first, greedy_ok=greedy_ok, greedy_note=note,
        per_position={"max_abs": max_abs.tolist(), "rel": rel.tolist(), "kl": kl.tolist(),
                      "top1": top1.tolist()})
    return result, excusable


def _judge_greedy(first: int | None, out: list[int], hf_tokens: list[int], ours: torch.Tensor,
                  ref: torch.Tensor, n_prompt: int, tol: Tolerances) -> tuple[bool, str]:
    if first is None:
        return True, f"{len(out)}/{len(out)} tokens equal"
    if first >= min(len(out), len(hf_tokens)):
        return False, f"continuations have different lengths ({len(out)} vs {len(hf_tokens)})"
    pos = n_prompt - 1 + first  # the position whose logits chose token `first`; same prefix
    e, h = out[first], hf_tokens[first]
    head = f"first differs at token {first}: engine {e}, HF {h}"
    if tol.greedy == "top5":
        ok = e in ref[pos].topk(5).indices.tolist() and h in ours[pos].topk(5).indices.tolist()
        return ok, head + (" (each within the other's top 5)" if ok else
                           " (not within each other's top 5)")
    gap = abs(ref[pos, e] - ref[pos, h]).item()
    limit = tol.atol + tol.rtol * ref[pos].abs().max().item()
    ok = gap <= limit
    return ok, head + (f" (a tie: HF logits {gap:.1e} apart)" if ok else
                       f" (HF logits {gap:.2e} apart, more than {limit:.1e})")


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
