"""What a parity check runs on, what it reports, and the tolerances it judges by.

`CheckPlan` is one check's resolved inputs; `EngineRun` what the engine produced; `Tolerances`
and their measured defaults per dtype and device; `ParityReport` holds the whole check (load
report, one `RunResult` per engine run, each with a `PromptResult` per prompt, an engine failure
or a localization) and turns into standard JSON with `to_dict`. The check itself is parity.py;
the comparison that fills these is compare.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from engine.runner.observer import Observations
from engine.validate.localize import Localization


@dataclass
class CheckPlan:
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
    quantization: str | None = None  # the engine's --quantization (HF stays at full precision)
    kv_cache_dtype: str = "auto"  # the engine's --kv-cache-dtype

    @property
    def probe_ids(self) -> list[int]:  # localization's one prefill: the longest prompt
        return max(self.prompt_ids, key=len)


@dataclass
class EngineRun:
    tokens: list[list[int]]
    logits: list[dict[int, torch.Tensor]]  # per prompt: position -> logits [vocab] float32 CPU
    load: dict | None  # the load report; None when nothing was loaded (random weights)
    probe: Observations | None = None  # probe points of one prefill of plan.probe_ids


@dataclass(frozen=True)
class Tolerances:
    """A position is within tolerance when max|engine - HF| <= atol + rtol * max|HF logit| and
    KL(HF||engine) <= kl. In reduced precision a share `outliers` of a run's positions may fall
    outside (a discrete flip: MoE routing or a near-tie, which HF itself shows in that dtype) if
    at each one both argmaxes stay in the other side's top 5. Greedy "exact": continuations
    equal, except at a tie (the two tokens' HF logits within the logit tolerance); "top5"
    (vLLM's rule): where they first differ, each side's token is in the other's top 5;
    "prefix": no rule per prompt, the run's greedy prefix share is judged (below).
    Localization counts a point as diverged above relative error `localize_rtol`.

    Quantized engines are judged per run rather than by logit error (atol is infinite): the
    share of positions whose argmax agrees with HF's must reach `min_top1`, the mean
    KL(HF||engine) over them stay within `mean_kl`, and the greedy continuations match HF's on
    at least a share `min_greedy_prefix` of their tokens before they first part (mean over
    the prompts); `kl` still bounds each position (with `outliers` excused)."""
    atol: float
    rtol: float
    kl: float
    greedy: str
    outliers: float
    localize_rtol: float
    min_top1: float = 0.0
    mean_kl: float = math.inf
    min_greedy_prefix: float = 0.0

    @property
    def judges_runs(self) -> bool:
        return self.min_top1 > 0 or math.isfinite(self.mean_kl) or self.min_greedy_prefix > 0


# (dtype, device type) -> defaults, measured in docs/VALIDATION.md. float32 on CUDA is as tight
# as on the CPU: the Triton kernels multiply float32 tiles in IEEE float32 (kernels/triton_common
# dot), and the 19 families' worst error on an H200 was 3.2e-5 absolute, 5.4e-6 relative.
TOLERANCES = {
    ("float32", "cpu"): Tolerances(1e-4, 1e-5, 1e-6, "exact", 0.0, 1e-4),
    ("float32", "cuda"): Tolerances(1e-4, 1e-5, 1e-6, "exact", 0.0, 1e-4),
    ("bfloat16", "cuda"): Tolerances(0.1, 0.06, 0.05, "top5", 0.02, 0.1),
    ("float16", "cuda"): Tolerances(0.02, 0.01, 5e-3, "top5", 0.01, 0.02),
}


# --quantization -> defaults for a quantized engine against HF at full precision, measured in
# docs/VALIDATION.md ("Quantized engines"). The same for every dtype and device: quantization
# error dominates rounding.
QUANTIZED_TOLERANCES = {
    "fp8": Tolerances(math.inf, 0.0, 2.0, "prefix", 0.05, 0.5, min_top1=0.6, mean_kl=0.15),
    "int8": Tolerances(math.inf, 0.0, 0.5, "top5", 0.02, 0.2, min_top1=0.85, mean_kl=0.01,
                       min_greedy_prefix=0.2),
}
QUANTIZED_TOLERANCES["compressed-tensors"] = QUANTIZED_TOLERANCES["fp8"]


def default_tolerances(dtype: torch.dtype, device: str | torch.device,
                       quantization: str | None = None,
                       kv_cache_dtype: str = "auto") -> Tolerances:
    """The dtype's and device's; a quantized scheme's; an FP8 KV cache (e4m3 keys and values,
    ~3% apart) is judged as FP8 weights are, by top-1, KL and greedy prefix."""
    if quantization not in (None, "none"):
        return QUANTIZED_TOLERANCES[quantization]
    if kv_cache_dtype != "auto":
        return QUANTIZED_TOLERANCES["fp8"]
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
    top1_agreement: float = math.nan  # over every position of every prompt
    mean_kl: float = math.nan
    greedy_prefix: float = math.nan  # mean share of each continuation before it parts from HF's
    aggregate_ok: bool = True  # the run-level rules (quantized engines), see Tolerances
    aggregate_note: str = ""

    @property
    def passed(self) -> bool:
        return self.aggregate_ok and all(p.passed for p in self.prompts)


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
    quantization: str = "none"  # the engine's scheme (HF runs at full precision)
    kv_cache_dtype: str = "auto"  # the engine's KV cache ("fp8": judged like FP8 weights)
    # {"missing", "unexpected", "misshaped"}; None when the engine never loaded the weights
    load: dict | None = None
    load_hints: list[str] = field(default_factory=list)
    runs: list[RunResult] = field(default_factory=list)
    failure: EngineFailure | None = None
    localization: Localization | None = None
    # e.g. the generated module checked is out of date with its spec (it runs as it is)
    warnings: list[str] = field(default_factory=list)

    @property
    def loaded(self) -> bool:
        return self.load is not None

    @property
    def load_ok(self) -> bool:
        """Weights were loaded, every tensor once with the right shape."""
        return self.load is not None and not any(
            self.load.get(k) for k in ("missing", "unexpected", "misshaped"))

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

