"""Sharding verification: does a model split over N tensor-parallel ranks hold exactly the
weights it holds on one, and compute the same logits?

`verify_sharding(model_dir, tp)` loads the checkpoint twice through the engine: at TP=1 (the
reference) and at TP=N. The reference is the model's own mapping of the checkpoint: its
load_weights has applied every renaming, fusion (q/k/v -> qkv_proj, gate/up -> gate_up_proj) and
transform (Conv1D transposes, per-head interleaving) exactly as at TP=N, so each TP=1 parameter
is "the full checkpoint tensor" as the model sees it. Each rank's pieces are gathered to the
driver and put back together with the layer's own description (`tp_shard_spec`, see
engine.distributed.ShardSpec); the result must equal the reference bit for bit: replicated
parameters on every rank, KV heads replicated where num_kv_heads < N, vocabulary padding rows
zero, fused parts in checkpoint order. Then one prompt runs prefill + greedy decode through the
paged KV cache at both sizes and the logits are compared at every position whose prefix both
sizes share (all of them unless greedy decoding parts at a near-tie).
Comparing TP=1 with HF transformers is engine.validate.parity's job.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.config import EngineConfig, load_config
from engine.core.llm_engine import LLMEngine
from engine.core.sampling_params import SamplingParams
from engine.layers.sharding import ShardSpec
from engine.runner.observer import ObserveSpec

DEFAULT_PROMPT_IDS = [0, 17, 93, 260, 301, 42, 7, 255, 128, 64, 5, 388, 211, 19, 77, 450, 3]
BLOCK = 16
GROUP_ORDER = ("embedding", "qkv", "o_proj", "gate_up", "up", "down", "experts", "router",
               "norms", "lm_head", "replicated", "other")


@dataclass
class ParamCheck:
    name: str
    group: str
    sharding: str  # ShardSpec.describe()
    full_shape: tuple[int, ...]
    rank_shape: tuple[int, ...]
    ok: bool
    problem: str = ""


@dataclass
class GroupRow:
    group: str
    params: int
    elements: int  # of the full tensors
    sharding: str
    failed: int
    problem: str  # the first failure, "" when all passed

    @property
    def ok(self) -> bool:
        return self.failed == 0


@dataclass
class ShardingReport:
    model: str
    tp: int
    device: str
    dtype: str
    params: list[ParamCheck]
    prompt_len: int
    decode_steps: int
    logits_max_abs: float  # over every position, TP=N vs TP=1
    logits_max_rel: float  # max_abs / max|TP=1 logit|
    top1_agreement: float  # share of positions whose argmax agrees
    greedy_match: bool  # every decode step's TP=N argmax is TP=1's greedy token
    logits_tolerance: float
    reference_tokens: list[int] = field(default_factory=list)
    # positions whose argmax differs although TP=1's top two are further apart than the
    # tolerance (a difference at a near-tie is rounding, not a sharding error)
    argmax_breaks: list[int] = field(default_factory=list)

    @property
    def params_ok(self) -> bool:
        return all(p.ok for p in self.params)

    @property
    def logits_ok(self) -> bool:
        return self.logits_max_abs <= self.logits_tolerance and not self.argmax_breaks

    @property
    def ok(self) -> bool:
        return self.params_ok and self.logits_ok

    def failures(self) -> list[ParamCheck]:
        return [p for p in self.params if not p.ok]

    def groups(self) -> list[GroupRow]:
        """One row per parameter group (embedding, qkv, o_proj, gate_up, down, experts,
        norms, lm_head, ...) for a table."""
        rows = []
        by_group: dict[str, list[ParamCheck]] = {}
        for p in self.params:
            by_group.setdefault(p.group, []).append(p)
        order = sorted(by_group, key=lambda g: (GROUP_ORDER.index(g) if g in GROUP_ORDER
                                                else len(GROUP_ORDER), g))
        for g in order:
            ps = by_group[g]
            bad = [p for p in ps if not p.ok]
            kinds = sorted({p.sharding for p in ps}, key=lambda k: (k == "replicated", k))
            rows.append(GroupRow(g, len(ps), sum(_numel(p.full_shape) for p in ps),
                                 "; ".join(kinds), len(bad),
                                 f"{bad[0].name}: {bad[0].problem}" if bad else ""))
        return rows

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(ok=self.ok, params_ok=self.params_ok, logits_ok=self.logits_ok,
                 groups=[dataclasses.asdict(g) | {"ok": g.ok} for g in self.groups()])
        return d


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# -- what each rank sends --------------------------------------------------------------------
def param_group(name: str, module: torch.nn.Module) -> str:
    """The table row a parameter belongs to, from its layer type and name."""
    from engine.layers.linear import (
        ColumnParallelLinear,
        MergedColumnParallelLinear,
        QKVParallelLinear,
        ReplicatedLinear,
        RowParallelLinear,
    )
    from engine.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding

    path = name.lower().split(".")
    attn = any("attn" in p or "attention" in p for p in path)
    if any("expert" in p for p in path) or "moe" in type(module).__name__.lower():
        return "experts"
    if isinstance(module, ParallelLMHead):
        return "lm_head"
    if isinstance(module, VocabParallelEmbedding):
        return "embedding"
    if isinstance(module, QKVParallelLinear):
        return "qkv"
    if isinstance(module, MergedColumnParallelLinear):
        return "gate_up"
    if isinstance(module, RowParallelLinear):
        return "o_proj" if attn else "down"
    if isinstance(module, ColumnParallelLinear):
        return "qkv" if attn else "up"
    if isinstance(module, ReplicatedLinear):
        return "router" if any(p in ("gate", "router") for p in path) else "replicated"
    if "norm" in type(module).__name__.lower() or any("norm" in p for p in path):
        return "norms"
    return "other"


def rank_params(runner) -> dict[str, tuple[torch.Tensor, ShardSpec | None, str]]:
    """Every parameter of this rank's model: (CPU copy, sharding description, group). Tied
    parameters appear once, under their first name. Runs on every rank (collective_rpc).
    FP8 parameters come as their bytes (uint8 views): torch cannot unpickle a float8 tensor
    (2.13), and bit-for-bit is what is compared."""
    out, seen = {}, set()
    for mod_name, module in runner.model.named_modules():
        describe = getattr(module, "tp_shard_spec", None)
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{mod_name}.{pname}" if mod_name else pname
            spec = describe(pname) if describe is not None else None
            data = param.detach().to("cpu", copy=True)
            if data.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                data = data.view(torch.uint8)
            out[name] = (data, spec, param_group(name, module))
    return out


# -- putting the pieces back together --------------------------------------------------------
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (so -0.0 != 0.0 and a NaN equals the same NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        a, b = (t.contiguous().view(_INT_OF_SIZE[t.element_size()]) for t in (a, b))
    return torch.equal(a, b)


def _reference_along(ref: torch.Tensor, spec: ShardSpec, full: int) -> torch.Tensor | None:
    """The reference as the ranks should hold it along spec.dim: its first `valid` entries,
    then zeros up to `full` (vocabulary padding)."""
    dim = spec.dim
    valid = spec.valid if spec.valid is not None else full
    if ref.shape[dim] < valid or valid > full:
        return None
    body = ref.narrow(dim, 0, valid)
    if valid == full:
        return body
    pad_shape = list(ref.shape)
    pad_shape[dim] = full - valid
    return torch.cat([body, torch.zeros(pad_shape, dtype=ref.dtype)], dim)


def _diagnose(piece: torch.Tensor, expected: torch.Tensor, ref_full: torch.Tensor,
              spec: ShardSpec) -> str:
    """Say what a wrong piece holds instead: another rank's piece, another part, or a piece
    cut along the wrong dimension."""
    dim, offset = spec.dim, 0
    for k, part in enumerate(spec.parts):
        for j in range(part.num_pieces):
            cand = ref_full.narrow(dim, offset + j * part.per_rank, part.per_rank)
            if _same(piece, cand):
                return f"it holds piece {j} of part {part.name or k} instead"
        offset += part.size
    if piece.dim() == 2:
        other, n = 1 - dim, piece.shape[dim]
        for j in range(ref_full.shape[other] // max(n, 1)):
            cand = ref_full.narrow(other, j * n, n)
            if _same(piece, cand) or _same(piece, cand.t()):
                how = "" if _same(piece, cand) else ", transposed"
                return (f"it holds piece {j} cut along dim {other}{how}: the loader cut the "
                        "wrong dimension")
    diff = (piece.float() - expected.float()).abs()
    return f"max |difference| {diff.max().item():.3g} at {diff.argmax().item()} (flat index)"


def check_param(name: str, ref: torch.Tensor, shards: list[torch.Tensor],
                spec: ShardSpec | None) -> str:
    """'' when the ranks' pieces put back together equal `ref` bit for bit, else the problem."""
    shapes = [tuple(s.shape) for s in shards]
    if spec is None:
        if any(s != tuple(ref.shape) for s in shapes):
            return (f"no sharding description (tp_shard_spec) and the ranks hold shapes {shapes}, "
                    f"not the full {tuple(ref.shape)}")
        spec_text = "undescribed, so replicated"
        spec = ShardSpec()
    else:
        spec_text = "replicated"
    if spec.dim is None:
        bad = [r for r, s in enumerate(shards) if not _same(s, ref)]
        return f"{spec_text}, but ranks {bad} differ from the full tensor" if bad else ""
    dim, local = spec.dim, sum(p.per_rank for p in spec.parts)
    full = sum(p.size for p in spec.parts)
    want = [*ref.shape]
    want[dim] = local
    if any(s != tuple(want) for s in shapes):
        return f"ranks hold shapes {shapes}, the description says {tuple(want)}"
    ref_full = _reference_along(ref, spec, full)
    if ref_full is None:
        return (f"the description covers {full} entries along dim {dim} ({spec.valid} real), "
                f"the full tensor has {ref.shape[dim]}")
    problems, offset, ref_offset = [], 0, 0
    for k, part in enumerate(spec.parts):
        label = part.name or str(k)
        for j in range(part.num_pieces):
            expected = ref_full.narrow(dim, ref_offset + j * part.per_rank, part.per_rank)
            for r in range(j * part.replicas, (j + 1) * part.replicas):
                piece = shards[r].narrow(dim, offset, part.per_rank)
                if not _same(piece, expected):
                    rows = f"{ref_offset + j * part.per_rank}:{ref_offset + (j + 1) * part.per_rank}"
                    what = (f"rank {r}'s piece of part {label} (full dim {dim} [{rows}]) "
                            f"differs: {_diagnose(piece, expected, ref_full, spec)}")
                    if part.replicas > 1:
                        what += f" (a replica of piece {j}, shared by {part.replicas} ranks)"
                    problems.append(what)
        offset += part.per_rank
        ref_offset += part.size
    if problems:
        more = f" (+{len(problems) - 2} more)" if len(problems) > 2 else ""
        return "; ".join(problems[:2]) + more
    return ""


# -- logits ----------------------------------------------------------------------------------
def _engine(model_dir: str | Path, tp: int, device: str, dtype: str, max_len: int,
            quantization: str | None = None) -> LLMEngine:
    config = EngineConfig.create(model_dir, dtype=dtype, device=device, max_num_seqs=1,
                                 enforce_eager=True, max_model_len=max_len,
                                 num_kv_blocks=-(-max_len // BLOCK) + 1, block_size=BLOCK,
                                 enable_prefix_caching=False, tensor_parallel_size=tp,
                                 quantization=quantization)
    return LLMEngine(config, stream_outputs=False)


def _logits_run(engine: LLMEngine, ids: list[int], steps: int) -> tuple[torch.Tensor, list[int]]:
    """Prefill `ids`, then `steps` greedy decode steps through the paged cache. Returns logits
    [len(ids) + steps, vocab] (position p predicts p+1) and the steps + 1 tokens."""
    engine.observe(ObserveSpec(logits=True))
    params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True,
                            prompt_logprobs=0)
    rid = engine.add_request(None, params, list(ids), request_id="tp-check")
    seq_id = engine.requests[rid].seqs[0].seq_id
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens = list(out.outputs[0].token_ids)
    seen = engine.take_observations().logits
    rows = [seen[(seq_id, p)] for p in range(len(ids) + steps)]
    return torch.stack(rows), tokens


def _default_dtype(device: str) -> str:
    return "float32" if torch.device(device).type == "cpu" else "bfloat16"


def default_logits_tolerance(dtype: str, max_logit: float, quantization: str = "none") -> float:
    """Largest |logit(TP=N) - logit(TP=1)| accepted: the ranks add partial sums in another
    order, exact only up to rounding. float32: 1e-3 (measured ~1e-6 on logits of size ~5).
    bf16: 2^-5 of the largest TP=1 logit (4 bf16 rounding units of 2^-7, accumulated over the
    layers), fp16: 2^-8 (its 3 more mantissa bits), so a model with large logits (Gemma's
    scaled embeddings: ~21) gets a proportionally larger bound. On 4x H200 every family stayed
    within 0.0175 of the largest logit in bf16 (docs/VALIDATION.md).

    Quantized: the weights and their scales are the same at every size (a row-parallel layer's
    ranks take each output channel's maximum together), so int8 (weight-only) keeps the bound
    of its dtype (measured <= 1.4e-5 at TP=2 on CPU). FP8 quantizes activations per token, and
    a row-parallel layer's ranks each quantize their slice of the token with its own scale (as
    vLLM does: no collective per layer), a difference of FP8 rounding as large as FP8's own
    error: 2^-2 of the largest logit (measured up to 0.115 of it, tiny gemma at TP=2)."""
    if quantization in ("fp8", "compressed-tensors"):
        return 2.0 ** -2 * max_logit
    if dtype in ("float32", "fp32", "float"):
        return 1e-3
    rel = 2.0 ** -8 if dtype in ("float16", "fp16", "half") else 2.0 ** -5
    return rel * max_logit


def verify_sharding(model_dir: str | Path, tp: int, device: str = "cpu", *,
                    dtype: str | None = None, prompt_ids: list[int] | None = None,
                    decode_steps: int = 4, logits_tolerance: float | None = None,
                    quantization: str | None = None) -> ShardingReport:
    """Load `model_dir` at TP=1 and at TP=`tp` (gloo on CPU, NCCL on CUDA) and check, for every
    parameter, that the ranks' pieces put back together equal the TP=1 parameter bit for bit,
    and that logits agree. The TP=1 reference runs first, in this process. With
    `quantization` both sizes quantize (quantized weights and their scales are compared bit for
    bit; the logits bound is default_logits_tolerance's for that scheme)."""
    dtype = dtype or _default_dtype(device)
    vocab = load_config(model_dir).get_text_config().vocab_size
    ids = [i % vocab for i in (prompt_ids or DEFAULT_PROMPT_IDS)]
    max_len = len(ids) + decode_steps + 2
    ref_engine = _engine(model_dir, 1, device, dtype, max_len, quantization)
    ref_quant = ref_engine.config.quantization.name
    try:
        ref_params = ref_engine.collective_rpc(rank_params)[0]
        ref_logits, ref_tokens = _logits_run(ref_engine, ids, decode_steps)
    finally:
        ref_engine.close()
    engine = _engine(model_dir, tp, device, dtype, max_len, quantization)
    try:
        per_rank = engine.collective_rpc(rank_params)
        tp_logits, tp_tokens = _logits_run(engine, ids, decode_steps)
    finally:
        engine.close()

    checks = []
    for name, (ref, _, grp) in ref_params.items():
        if name not in per_rank[0]:
            checks.append(ParamCheck(name, grp, "?", tuple(ref.shape), (), False,
                                     f"missing at tensor_parallel_size={tp}"))
            continue
        _, spec, grp = per_rank[0][name]
        shards = [r[name][0] for r in per_rank]
        problem = check_param(name, ref, shards, spec)
        checks.append(ParamCheck(name, grp, spec.describe() if spec else "undescribed",
                                 tuple(ref.shape), tuple(shards[0].shape), not problem, problem))
    for name in per_rank[0].keys() - ref_params.keys():
        checks.append(ParamCheck(name, per_rank[0][name][2], "?", (), (), False,
                                 "exists only at tensor_parallel_size > 1"))

    # positions whose prefix both runs share: the prompt's, then decode steps until the
    # greedy tokens part (a near-tie in reduced precision)
    same = next((i for i, (a, b) in enumerate(zip(tp_tokens, ref_tokens)) if a != b),
                decode_steps)
    n = len(ids) + min(same, decode_steps)
    tp_logits, ref_logits = tp_logits[:n], ref_logits[:n]
    diff = (tp_logits - ref_logits).abs()
    max_abs = diff.max().item()
    top1 = (tp_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    max_logit = ref_logits.abs().max().item()
    tol = logits_tolerance if logits_tolerance is not None else \
        default_logits_tolerance(dtype, max_logit, ref_quant)
    ours, theirs = tp_logits.argmax(-1), ref_logits.argmax(-1)
    gap = ref_logits.gather(1, theirs[:, None]) - ref_logits.gather(1, ours[:, None])
    breaks = ((ours != theirs) & (gap[:, 0] > tol)).nonzero().flatten().tolist()
    return ShardingReport(
        model=str(model_dir), tp=tp, device=device, dtype=dtype, params=checks,
        prompt_len=len(ids), decode_steps=decode_steps, logits_max_abs=max_abs,
        logits_max_rel=max_abs / max(max_logit, 1e-30),
        top1_agreement=top1, greedy_match=tp_tokens[:decode_steps] == ref_tokens[:decode_steps],
        logits_tolerance=tol, reference_tokens=ref_tokens[:decode_steps], argmax_breaks=breaks)


def verify_model_sharding(model: str | Path, tp: int, device: str = "auto",
                          dtype: str = "auto", seed: int = 0,
                          quantization: str | None = None) -> ShardingReport:
    """verify_sharding for MODEL as `aphro parity-check` names it: a local checkpoint folder, or
    a spec / registered architecture checked on a tiny random checkpoint (made with `seed`, as
    parity's is, in a temporary folder)."""
    import tempfile

    from engine.config import resolve_device

    device = str(resolve_device(device))
    dtype = _default_dtype(device) if dtype in (None, "auto") else dtype
    if Path(model).is_dir():
        return verify_sharding(model, tp, device, dtype=dtype, quantization=quantization)
    from engine.validate.tiny import tiny_checkpoint_for

    with tempfile.TemporaryDirectory(prefix="aphro-tp-") as tmp:
        ckpt = tiny_checkpoint_for(model, Path(tmp) / "ckpt", seed=seed)
        report = verify_sharding(ckpt, tp, device, dtype=dtype, quantization=quantization)
    report.model = str(model)
    return report
