"""Result records (engine.bench.results) of bench throughput and bench latency put together
from what the runs measured, and the lines every run prints: hardware, model, workload, KV
budget, roofline and the fraction of it reached."""

from __future__ import annotations

import math

from engine.bench.engine_bench import model_record
from engine.bench.hardware import describe_hardware
from engine.bench.results import make_record, tpot_roofline_ratio
from engine.bench.roofline import (
    CostModel,
    latency_roofline,
    shape_of,
    throughput_roofline,
)

_ELEM_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1}


def cost_model(hw: dict, hf_config, facts: dict) -> CostModel | None:
    """None where the card's rates were not measured (CPU)."""
    if hw.get("copy_bandwidth_gbs") is None or hw.get("matmul_tflops") is None:
        return None
    elem = _ELEM_BYTES.get(facts["dtype"], 2)
    return CostModel(shape_of(hf_config), facts["weight_bytes_per_rank"], elem, facts["tp"],
                     hw["copy_bandwidth_gbs"], hw["matmul_tflops"],
                     kv_elem_bytes=_ELEM_BYTES.get(facts.get("kv_cache_dtype"), elem))


def throughput_record(*, hw: dict, hf_config, facts: dict, model_name: str, random_weights: bool,
                      workload: dict, prompt_lens: list[int], output_len: int,
                      rows: list[dict], command: str) -> dict:
    """rows[0] is the engine's; every row that ran gets "ratio": the engine's output tok/s over
    its own."""
    engine = rows[0]
    for row in rows:
        if row.get("output_tok_s"):
            row["ratio"] = engine["output_tok_s"] / row["output_tok_s"]
    cost = cost_model(hw, hf_config, facts)
    roofline = None
    if cost is not None:
        roofline = throughput_roofline(cost, prompt_lens, output_len, facts["max_num_seqs"],
                                       facts["kv_tokens"])
        roofline["fraction"] = engine["output_tok_s"] / roofline["output_tok_s"]
    workload = {**workload, "num_prompts": len(prompt_lens),
                "prompt_tokens": sum(prompt_lens), "min_input_len": min(prompt_lens),
                "max_input_len": max(prompt_lens), "output_len": output_len,
                "ignore_eos": True, "greedy": True}
    return make_record("throughput", hardware=hw,
                       model=model_record(model_name, hf_config, facts, random_weights),
                       workload=workload, results={"rows": rows, "engine": _kv(facts)},
                       roofline=roofline, command=command)


def latency_record(*, hw: dict, hf_config, facts: dict, model_name: str, random_weights: bool,
                   workload: dict, results: dict, command: str) -> dict:
    cost = cost_model(hw, hf_config, facts)
    roofline = None
    if cost is not None:
        roofline = latency_roofline(cost, workload["batch_size"], workload["input_len"],
                                    workload["output_len"])
        roofline["tpot_fraction"] = roofline["tpot_ms"] / results["tpot"]["p50_ms"]
        roofline["ttft_fraction"] = roofline["ttft_ms"] / results["ttft"]["p50_ms"]
    return make_record("latency", hardware=hw,
                       model=model_record(model_name, hf_config, facts, random_weights),
                       workload=workload, results={**results, "engine": _kv(facts)},
                       roofline=roofline, command=command)


def _kv(facts: dict) -> dict:
    keys = ("device", "kv_blocks", "block_size", "kv_tokens", "max_num_seqs",
            "max_num_batched_tokens", "max_model_len", "cuda_graphs", "async_scheduling")
    return {**{k: facts[k] for k in keys}, "kv_cache_dtype": facts.get("kv_cache_dtype")}


def describe(record: dict) -> list[str]:
    """The context lines printed with every run (the figures' table is printed beside)."""
    m, w, e = record["model"], record["workload"], record["results"]["engine"]
    shape = m["shape"]
    weights = m["weight_bytes"] or m["weight_bytes_per_rank"] * m["tp"]
    lines = [describe_hardware(record["hardware"]),
             f"model: {m['name']} ({m['architecture']}, {shape['num_hidden_layers']} layers x "
             f"{shape['hidden_size']}"
             + (f", {shape['num_experts']} experts top-{shape['num_experts_per_tok']}"
                if "num_experts" in shape else "")
             + f"), {_si(m['parameters'])} parameters, {_si(weights)}B of weights, "
             f"{m['dtype']}, quantization {m['quantization']}, TP {m['tp']}"
             + (", random weights" if m["random_weights"] else ""),
             "workload: " + _workload_line(record["kind"], w),
             (f"KV cache: {e['kv_blocks']} blocks x {e['block_size']} = {e['kv_tokens']} "
              f"tokens" + (f" in {e['kv_cache_dtype']}" if e.get("kv_cache_dtype") else "")
              + f"; max_num_seqs {e['max_num_seqs']}, max_num_batched_tokens "
              f"{e['max_num_batched_tokens']}, CUDA graphs {e['cuda_graphs']}, async "
              f"scheduling {e['async_scheduling']}")]
    lines.append(_roofline_line(record))
    return lines


def _workload_line(kind: str, w: dict) -> str:
    if kind == "latency":
        return (f"batch {w['batch_size']}, {w['input_len']} prompt + {w['output_len']} "
                f"generated tokens, greedy, {w['num_iters_warmup']} warm-up + "
                f"{w['num_iters']} timed iterations")
    source = f"prompts from {w['dataset']}" if w.get("dataset") else "random prompts"
    lens = (f"{w['min_input_len']}" if w["min_input_len"] == w["max_input_len"]
            else f"{w['min_input_len']}-{w['max_input_len']}")
    return (f"{w['num_prompts']} {source} x {lens} in / {w['output_len']} out, greedy, EOS "
            f"ignored; baseline on {w.get('baseline_num_prompts') or 0} of them")


def _roofline_line(record: dict) -> str:
    r = record["roofline"]
    if r is None:
        return "roofline: not computed (no measured copy bandwidth / matmul rate on this device)"
    if record["kind"] == "latency":
        tpot = record["results"]["tpot"]["p50_ms"]
        return (f"roofline: TPOT >= {r['tpot_ms']:.3f} ms (weights + KV / copy bandwidth), "
                f"measured {tpot:.3f} ms = {_x(tpot_roofline_ratio(record))} the bound "
                f"({r['tpot_fraction']:.0%} reached); TTFT >= {r['ttft_ms']:.2f} ms")
    return (f"roofline: <= {r['output_tok_s']:,.0f} output tok/s (prefill {r['prefill_s']:.2f} s"
            f" at the matmul rate + decode {r['decode_s']:.2f} s at batch {r['decode_batch']}); "
            f"the engine reached {r['fraction']:.0%} of it")


def _si(n: float) -> str:
    """1.23 G, 45.6 M, 7.8 k."""
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} "


def _x(v: float) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.2f}x"
