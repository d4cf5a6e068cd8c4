"""The HF transformers side of a parity check, and the comparison of the engine against it.

HF runs in float32 with eager attention: `generate` for the greedy continuation, and one
teacher-forced forward over the engine's own prompt + output tokens for the reference logits,
so every position is compared on the same prefix. The results are engine/validate/report.py's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.errors import AphroError
from engine.validate.report import CheckPlan, EngineRun, PromptResult, RunResult, Tolerances


def load_hf(ckpt: Path, device: torch.device):
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
def hf_greedy(hf, ids: list[int], n: int, device: torch.device) -> list[int]:
    """HF generate, greedy, exactly n tokens: none of the checkpoint's generation-config
    processors, no stop at EOS (the engine runs with ignore_eos)."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=n, eos_token_id=[],
                           pad_token_id=0)
    x = torch.tensor([ids], device=device)
    out = hf.generate(x, attention_mask=torch.ones_like(x), generation_config=cfg)
    return out[0, len(ids):].tolist()


@torch.no_grad()
def hf_logits(hf, ids: list[int], device: torch.device) -> torch.Tensor:
    """Reference logits [len(ids), vocab] float32 on the CPU, one forward."""
    vocab = hf.config.get_text_config().vocab_size
    return hf(torch.tensor([ids], device=device)).logits[0, :, :vocab].float().cpu()


def hf_reference_logits(hf, prompt: list[int], out: list[int], device: torch.device,
                        long_rope_from: int | None = None) -> torch.Tensor:
    """Teacher-forced: HF's logits for the prompt + the engine's own output, in one forward.
    LongRoPE (Phi-3): HF generate uses the short factors until the sequence passes the original
    length, then recomputes everything with the long ones; so when a prompt within it grows
    past it, the positions before it are scored by a forward over just those tokens."""
    ids = prompt + out[:-1]
    ref = hf_logits(hf, ids, device)
    if long_rope_from is not None and len(prompt) <= long_rope_from < len(ids):
        ref[:long_rope_from] = hf_logits(hf, ids[:long_rope_from], device)
    return ref


def compare_run(name: str, chunk: int | None, run: EngineRun, hf, hf_tokens, plan: CheckPlan):
    """Teacher-forced: HF runs each prompt + the engine's own output (hf_reference_logits)."""
    from engine.layers.rotary import long_rope_from

    results, excusable = [], []
    long_from = long_rope_from(plan.hf_config)
    for i, (ids, out) in enumerate(zip(plan.prompt_ids, run.tokens)):
        ref = hf_reference_logits(hf, ids, out, plan.device, long_from)
        result, ok = compare_prompt(i, plan.prompts[i], ids, out, run.logits[i], ref,
                                     hf_tokens[i], plan.tol)
        results.append(result)
        excusable.append(ok)
    total = sum(p.num_positions for p in results)
    excused = (sum(len(p.outliers) for p in results) <= int(plan.tol.outliers * total)
               and all(excusable))
    for p in results:
        p.logits_ok = not p.outliers or excused
    return judge_run(RunResult(name, chunk, results), plan.tol)


def judge_run(run: RunResult, tol: Tolerances) -> RunResult:
    """Fill the run's aggregates (top-1 agreement, mean KL over every position, mean greedy
    prefix share) and, where the tolerances set them, judge them."""
    total = sum(p.num_positions for p in run.prompts)
    if not total:
        return run
    run.top1_agreement = sum(p.top1_agreement * p.num_positions for p in run.prompts) / total
    run.mean_kl = sum(p.mean_kl * p.num_positions for p in run.prompts) / total
    run.greedy_prefix = sum(
        1.0 if p.first_mismatch is None else p.first_mismatch / max(1, len(p.engine_tokens))
        for p in run.prompts) / len(run.prompts)
    problems = []
    if not run.top1_agreement >= tol.min_top1:  # NaN fails
        problems.append(f"top-1 agreement {run.top1_agreement:.1%} < {tol.min_top1:.0%}")
    if not run.mean_kl <= tol.mean_kl:
        problems.append(f"mean KL {run.mean_kl:.2e} > {tol.mean_kl:g}")
    if not run.greedy_prefix >= tol.min_greedy_prefix:
        problems.append(f"greedy prefix {run.greedy_prefix:.0%} < {tol.min_greedy_prefix:.0%}")
    run.aggregate_ok = not problems
    run.aggregate_note = "; ".join(problems)
    return run


def compare_prompt(index: int, prompt: str | None, ids: list[int], out: list[int],
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
    greedy_ok, note = judge_greedy(first, out, hf_tokens, ours, ref, len(ids), tol)
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


def judge_greedy(first: int | None, out: list[int], hf_tokens: list[int], ours: torch.Tensor,
                  ref: torch.Tensor, n_prompt: int, tol: Tolerances) -> tuple[bool, str]:
    if first is None:
        return True, f"{len(out)}/{len(out)} tokens equal"
    if first >= min(len(out), len(hf_tokens)):
        return False, f"continuations have different lengths ({len(out)} vs {len(hf_tokens)})"
    pos = n_prompt - 1 + first  # the position whose logits chose token `first`; same prefix
    e, h = out[first], hf_tokens[first]
    head = f"first differs at token {first}: engine {e}, HF {h}"
    if tol.greedy == "prefix":
        return True, head + f" (after {first}/{len(out)} equal tokens)"
    if tol.greedy == "top5":
        ok = e in ref[pos].topk(5).indices.tolist() and h in ours[pos].topk(5).indices.tolist()
        return ok, head + (" (each within the other's top 5)" if ok else
                           " (not within each other's top 5)")
    gap = abs(ref[pos, e] - ref[pos, h]).item()
    limit = tol.atol + tol.rtol * ref[pos].abs().max().item()
    ok = gap <= limit
    return ok, head + (f" (a tie: HF logits {gap:.1e} apart)" if ok else
                       f" (HF logits {gap:.2e} apart, more than {limit:.1e})")
