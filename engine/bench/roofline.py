"""What a model costs per token, from its config, and the rooflines the benchmarks report beside
their figures (the time no implementation on this card can beat, by this simple model):

- A decode step at batch b and mean context c streams the weights it touches once (all but the
  input embedding table, of which it gathers a row a token) plus the KV cache of its b
  sequences, and computes 2 * active parameters + attention FLOPs per token:
  step >= max((W(b) + b * c * kv_bytes_per_token) / copy_BW, b * flops(c) / matmul_rate).
  W(b) is every weight byte for a dense model; for a mixture of experts the shared weights plus
  the experts b tokens are expected to touch under uniform routing, E * (1 - (1 - k/E)^b) of E.
- Batch-1 TPOT (bench latency): that step at b = the batch size; TTFT: the prompts' prefill
  FLOPs at the matmul rate (or the weights once at copy bandwidth, whichever is longer).
- Offline throughput (bench throughput): every prompt's prefill FLOPs at the matmul rate, plus
  decode at full batch - b = min(max_num_seqs, prompts, KV capacity / tokens per sequence) in
  waves of output_len steps at the mean context input + output / 2 - added up.

Prefill FLOPs of a prompt of L tokens: 2 * active parameters * L + 2 * layers * heads * head_dim
* L^2 (QK^T and PV of causal attention). Per rank: FLOPs, weight bytes and KV heads / tp. The
rates are the ones measured in the same run (engine.bench.hardware); without them (CPU) there is
no roofline.
"""

from __future__ import annotations

import math


def shape_of(hf_config) -> dict:
    """The dimensions the cost model needs (text model of a multimodal config)."""
    t = hf_config.get_text_config()
    heads = t.num_attention_heads
    shape = {"hidden_size": t.hidden_size, "num_hidden_layers": t.num_hidden_layers,
             "num_attention_heads": heads,
             "num_key_value_heads": getattr(t, "num_key_value_heads", None) or heads,
             "head_dim": getattr(t, "head_dim", None) or t.hidden_size // heads,
             "intermediate_size": getattr(t, "intermediate_size", None) or 4 * t.hidden_size,
             "vocab_size": t.vocab_size,
             "tie_word_embeddings": bool(getattr(t, "tie_word_embeddings", False))}
    experts = getattr(t, "num_local_experts", None) or getattr(t, "num_experts", None)
    if experts:
        shape["num_experts"] = experts
        shape["num_experts_per_tok"] = getattr(t, "num_experts_per_tok", None) or 2
        shape["moe_intermediate_size"] = (getattr(t, "moe_intermediate_size", None)
                                          or shape["intermediate_size"])
    return shape


def parameter_counts(shape: dict) -> dict:
    """{"total", "active" (matmul weights one token uses, lm head included, embedding not),
    "experts" (all expert weights)} from the shape (Llama-style blocks: q/k/v/o, gated MLP)."""
    h, hd, layers = shape["hidden_size"], shape["head_dim"], shape["num_hidden_layers"]
    attn = h * hd * (2 * shape["num_attention_heads"] + 2 * shape["num_key_value_heads"])
    embed = shape["vocab_size"] * h
    lm_head = embed
    if "num_experts" in shape:
        one_expert = 3 * h * shape["moe_intermediate_size"]
        experts = shape["num_experts"] * one_expert
        mlp_active = shape["num_experts_per_tok"] * one_expert + h * shape["num_experts"]
        mlp_total = experts + h * shape["num_experts"]
    else:
        experts = 0
        mlp_active = mlp_total = 3 * h * shape["intermediate_size"]
    norms = layers * 2 * h + h
    total = layers * (attn + mlp_total) + norms + embed + (0 if shape["tie_word_embeddings"]
                                                           else lm_head)
    return {"total": total, "active": layers * (attn + mlp_active) + lm_head,
            "experts": layers * experts}


def kv_bytes_per_token(shape: dict, kv_elem_bytes: int) -> int:
    """K and V of every layer for one token, all ranks together."""
    return (2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * shape["head_dim"]
            * kv_elem_bytes)


class CostModel:
    """Per-rank costs of one model on one card (bytes/s and FLOP/s measured in the same run)."""

    def __init__(self, shape: dict, weight_bytes_per_rank: int, elem_bytes: int, tp: int,
                 copy_bandwidth_gbs: float, matmul_tflops: float,
                 kv_elem_bytes: int | None = None) -> None:
        """elem_bytes: the model dtype's (the embedding table); kv_elem_bytes: the KV cache's
        (default the same)."""
        self.shape, self.tp = shape, tp
        counts = parameter_counts(shape)
        self.active = counts["active"]
        self.expert_share = counts["experts"] / counts["total"]
        # streamed per step: every weight but the input embedding table (one row a token is
        # gathered; the LM head is streamed, tied or not)
        embed = 0 if shape["tie_word_embeddings"] else \
            shape["vocab_size"] * shape["hidden_size"] * elem_bytes // tp
        self.weights = weight_bytes_per_rank - embed
        kv_heads_rank = max(1, shape["num_key_value_heads"] // tp)
        self.kv_token = kv_bytes_per_token(shape, kv_elem_bytes or elem_bytes) // shape[
            "num_key_value_heads"] * kv_heads_rank
        self.bw = copy_bandwidth_gbs * 1e9
        self.rate = matmul_tflops * 1e12

    def weights_touched(self, batch: int) -> float:
        if not self.expert_share:
            return float(self.weights)
        e, k = self.shape["num_experts"], self.shape["num_experts_per_tok"]
        touched = e * (1 - (1 - k / e) ** batch) / e
        return self.weights * (1 - self.expert_share + self.expert_share * touched)

    def attn_flops(self, context: float) -> float:
        """Attention FLOPs of one token at `context` (per rank)."""
        s = self.shape
        return 4 * s["num_hidden_layers"] * s["num_attention_heads"] * s["head_dim"] * context \
            / self.tp

    def decode_step_s(self, batch: int, context: float) -> float:
        read = (self.weights_touched(batch) + batch * context * self.kv_token) / self.bw
        compute = batch * (2 * self.active / self.tp + self.attn_flops(context)) / self.rate
        return max(read, compute)

    def prefill_s(self, prompt_lens: list[int]) -> float:
        flops = sum(2 * self.active / self.tp * n + self.attn_flops(n / 2) * n
                    for n in prompt_lens)
        return max(flops / self.rate, self.weights / self.bw)


def latency_roofline(cost: CostModel, batch: int, input_len: int, output_len: int) -> dict:
    """Bounds of bench latency's TTFT and TPOT (ms)."""
    return {"method": "decode: weights (+ touched experts) + KV at copy bandwidth, or FLOPs at "
                      "the matmul rate; TTFT: prefill FLOPs at the matmul rate",
            "tpot_ms": cost.decode_step_s(batch, input_len + output_len / 2) * 1e3,
            "ttft_ms": cost.prefill_s([input_len] * batch) * 1e3,
            "weight_bytes_per_rank": cost.weights,
            "copy_bandwidth_gbs": cost.bw / 1e9, "matmul_tflops": cost.rate / 1e12}


def throughput_roofline(cost: CostModel, prompt_lens: list[int], output_len: int,
                        max_num_seqs: int, kv_tokens: int) -> dict:
    """Bound of bench throughput's output tok/s: prefill of every prompt at the matmul rate +
    decode in waves at full batch."""
    n = len(prompt_lens)
    mean_in = sum(prompt_lens) / n
    per_seq = math.ceil(mean_in + output_len)
    batch = max(1, min(max_num_seqs, n, kv_tokens // max(per_seq, 1)))
    prefill = cost.prefill_s(prompt_lens)
    decode, left = 0.0, n
    while left > 0:
        b = min(batch, left)
        decode += output_len * cost.decode_step_s(b, mean_in + output_len / 2)
        left -= b
    total = prefill + decode
    return {"method": "prefill FLOPs at the matmul rate + decode at full batch (weights + KV "
                      "at copy bandwidth, or FLOPs at the matmul rate, per step)",
            "prefill_s": prefill, "decode_s": decode, "decode_batch": batch,
            "seconds": total, "output_tok_s": n * output_len / total,
            "copy_bandwidth_gbs": cost.bw / 1e9, "matmul_tflops": cost.rate / 1e12}
