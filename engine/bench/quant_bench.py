"""Quantization side by side, in one process: for each scheme (none = the model dtype, fp8,
int8) on one model shape, batch-1 decode time per token (TPOT), offline throughput, the weight
bytes of a rank, and parity figures against HF float32; and the quantized matmuls beside the
model-dtype one at the shapes of that model.

Figures only: nothing here asserts a time. The model is random (a preset shape, load_format
"dummy": nothing written or downloaded), quantized at load time; parity runs on a random
checkpoint of `parity_preset`, saved once (a real HF forward needs real files).
"""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import torch

from engine.bench.engine_bench import (
    make_random_checkpoint,
    preset_config,
    preset_config_dir,
    random_prompts,
    run_throughput,
)
from engine.bench.latency import decode_latency

SCHEMES = ("none", "fp8", "int8")


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compare_quantization(preset: str = "llama-8b", schemes: tuple[str, ...] = SCHEMES,
                         device: str = "cuda", dtype: str = "bfloat16",
                         latency_input: int = 128, latency_output: int = 128,
                         num_prompts: int = 1000, input_len: int = 256, output_len: int = 256,
                         parity_preset: str | None = "llama-1b", parity_tokens: int = 32,
                         progress=print) -> dict:
    """One row per scheme: tpot_ms (batch-1 decode, median step), throughput_tok_s (output
    tokens/s of num_prompts x input_len/output_len, greedy, EOS ignored), weight_gb (one
    rank's parameters), parity (top-1 agreement, mean KL, greedy prefix against HF float32 on
    a random `parity_preset` checkpoint; None to skip), and ratios to the first scheme."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="aphro-quant-bench-") as tmp:
        cfg_dir = preset_config_dir(preset, Path(tmp) / "config")
        for scheme in schemes:
            quant = None if scheme == "none" else scheme
            progress(f"{scheme}: batch-1 decode, {latency_input} + {latency_output} tokens")
            lat = decode_latency(cfg_dir, 1, latency_input, latency_output, dtype=dtype,
                                 device=device, load_format="dummy", quantization=quant,
                                 num_iters_warmup=1, num_iters=3)
            _free()
            progress(f"{scheme}: throughput, {num_prompts} x {input_len}/{output_len}")
            prompts = random_prompts(num_prompts, input_len,
                                     lat["hf_config"].get_text_config().vocab_size)
            thr = run_throughput(cfg_dir, prompts, output_len, device=device, dtype=dtype,
                                 quantization=quant, load_format="dummy")
            _free()
            rows.append({"scheme": scheme, "tpot_ms": lat["results"]["tpot"]["p50_ms"],
                         "prefill_ms": lat["results"]["ttft"]["p50_ms"],
                         "throughput_tok_s": thr["row"]["output_tok_s"],
                         "weight_gb": lat["facts"]["weight_bytes_per_rank"] / 1e9,
                         "kv_blocks": thr["facts"]["kv_blocks"],
                         "device": lat["facts"]["device"]})
        if parity_preset:
            ckpt = make_random_checkpoint(Path(tmp) / "parity", parity_preset)
            for row in rows:
                progress(f"{row['scheme']}: parity against HF float32 ({parity_preset})")
                row["parity"] = _parity_row(ckpt, row["scheme"], device, dtype, parity_tokens)
                _free()
    base = rows[0]
    for row in rows:
        row["tpot_ratio"] = row["tpot_ms"] / base["tpot_ms"]
        row["throughput_ratio"] = row["throughput_tok_s"] / base["throughput_tok_s"]
        row["weight_ratio"] = row["weight_gb"] / base["weight_gb"]
    return {"preset": preset, "dtype": dtype, "latency": f"{latency_input}+{latency_output}",
            "throughput": f"{num_prompts}x{input_len}/{output_len}",
            "parity_preset": parity_preset, "rows": rows}


def _parity_row(ckpt: Path, scheme: str, device: str, dtype: str, tokens: int) -> dict:
    from engine.validate.parity import run_parity

    report = run_parity(ckpt, dtype=dtype, device=device, max_new_tokens=tokens,
                        chunked_prefill=False, quantization=None if scheme == "none" else scheme)
    if report.failure is not None:
        return {"passed": False, "error": report.failure.error}
    run = report.runs[0]
    return {"passed": report.passed, "top1": run.top1_agreement, "mean_kl": run.mean_kl,
            "max_kl": max(p.max_kl for p in run.prompts), "greedy_prefix": run.greedy_prefix,
            "max_rel": max(p.max_rel for p in run.prompts)}


def quant_matmul_bench(preset: str = "llama-8b", tokens: tuple[int, ...] = (1, 16, 256, 4096),
                       device: str = "cuda") -> list[dict]:
    """Each linear shape of `preset` (qkv, o, gate_up, down) at several token counts: ms of
    bf16 F.linear (cuBLAS), the INT8 dequantizing Triton matmul, FP8 activation quantization
    + torch._scaled_mm (compute capability >= 8.9), and the weight GB/s each reaches."""
    import triton.testing

    from engine.layers.quantization.fp8 import fp8_supported

    cfg = preset_config(preset)
    h, i = cfg.hidden_size, cfg.intermediate_size
    head = h // cfg.num_attention_heads
    shapes = {"qkv": ((cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * head, h),
              "o_proj": (h, h), "gate_up": (2 * i, h), "down": (h, i)}
    dev = torch.device(device)
    fp8 = fp8_supported(dev)

    def bench(fn) -> float:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    rows = []
    for name, (n, k) in shapes.items():
        rows += _matmul_rows(name, n, k, tokens, dev, fp8, bench)
        _free()
    return rows


def _matmul_rows(name: str, n: int, k: int, tokens: tuple[int, ...], dev: torch.device,
                 fp8: bool, bench) -> list[dict]:
    import torch.nn.functional as F

    from engine.layers.quantization.fp8 import fp8_matmul
    from kernels.ops import int8_weight_matmul, per_token_quant_fp8

    w = torch.randn(n, k, dtype=torch.bfloat16, device=dev) / k ** 0.5
    w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev)
    s8 = torch.rand(n, device=dev) * 1e-2
    wf8 = w.to(torch.float8_e4m3fn) if fp8 else None
    sf8 = torch.ones(n, device=dev)
    rows = []
    for m in tokens:
        x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
        row = {"layer": name, "m": m, "n": n, "k": k,
               "bf16_ms": bench(lambda x=x: F.linear(x, w)),
               "int8_ms": bench(lambda x=x: int8_weight_matmul(x, w8, s8))}
        if fp8:
            row["fp8_ms"] = bench(lambda x=x: fp8_matmul(
                *per_token_quant_fp8(x), wf8, sf8, torch.bfloat16, True))
        for kind, nbytes in (("bf16", 2), ("int8", 1), ("fp8", 1)):
            if f"{kind}_ms" in row:
                row[f"{kind}_weight_gb_s"] = n * k * nbytes / (row[f"{kind}_ms"] * 1e-3) / 1e9
        rows.append(row)
    return rows
