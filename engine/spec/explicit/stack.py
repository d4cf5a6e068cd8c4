"""The explicit file's decoder layer, model body and *ForCausalLM class (forward, logits,
load_weights with the stacked-params table, the tiny config parity-check builds)."""

from __future__ import annotations

import json

from engine.spec.explicit.code import (
    Names,
    call,
    config_expr,
    dict_lines,
    forward_sig,
    literal,
    norm_expr,
)
from engine.spec.schema import ModelSpec


def layer_class(spec: ModelSpec, n: Names) -> list[str]:
    a, c, ck = spec.arch, spec.arch.config, spec.arch.checkpoint
    where, parallel = a.layer.norm_position, a.layer.residual == "parallel"
    norm = norm_expr(spec, "hidden_size", "eps")
    lines = [
        f"class {n.prefix}DecoderLayer(nn.Module):",
        ("    def __init__(self, config, layer_idx: int, linear_method: LinearMethod | None)"
         " -> None:"),
        "        super().__init__()",
        f"        hidden_size, eps = {config_expr(c.hidden_size)}, {config_expr(c.norm_eps)}",
    ]
    if where != "post":
        lines.append(f"        self.{ck.input_norm} = {norm}")
    lines += call(8, f"self.{ck.attention} = ", f"{n.prefix}Attention",
                   ["config", "layer_idx", "linear_method"])
    if where != "pre" or not a.layer.shared_norm:
        lines.append(f"        self.{ck.post_attention_norm} = {norm}")
    if where == "sandwich":
        lines.append(f"        self.{ck.pre_mlp_norm} = {norm}")
    lines.append(f"        self.{ck.mlp} = {n.prefix}MLP(config, linear_method)")
    if where != "pre":
        lines.append(f"        self.{ck.post_mlp_norm} = {norm}")
    m = c.residual_multiplier is not None
    if m:
        lines.append("        # each sub-layer's output is scaled before it joins the residual")
        lines.append(f"        self.residual_multiplier = {config_expr(c.residual_multiplier)}")
    lines += ["", *forward_sig(
        ["positions", "hidden_states", "residual", "kv_cache", "attn_metadata"],
        "tuple[torch.Tensor, torch.Tensor]")]
    lines += [
        ('        """Returns (this layer\'s update, the residual stream before it): the next norm'
         " adds"),
        '        them in one fused pass, and their sum is the layer\'s output."""']
    attn = call(8, "hidden_states = ", f"self.{ck.attention}",
                ["positions", "hidden_states", "kv_cache", "attn_metadata"])
    if where != "pre":
        attn.append(f"        hidden_states = self.{ck.post_attention_norm}(hidden_states)")
    scale = ["        hidden_states = hidden_states * self.residual_multiplier"] if m else []
    mlp = [f"        hidden_states = self.{ck.mlp}(hidden_states)"]
    if where != "pre":
        mlp.append(f"        hidden_states = self.{ck.post_mlp_norm}(hidden_states)")
    done = [*mlp, *scale, "        return hidden_states, residual"]
    if where == "post":  # OLMo 2: a norm on each sub-layer's output, none before
        return [*lines,
                "        if residual is not None:",
                "            hidden_states = hidden_states + residual",
                "        residual = hidden_states",
                *attn, *scale,
                "        hidden_states = residual = hidden_states + residual", *done]
    lines += [
        "        if residual is None:",
        "            residual = hidden_states",
        f"            hidden_states = self.{ck.input_norm}(hidden_states)",
        "        else:",
        *call(12, "hidden_states, residual = ", f"self.{ck.input_norm}",
               ["hidden_states", "residual"])]
    if parallel:  # attention and MLP side by side, on the same input stream
        mlp_in = "hidden_states" if a.layer.shared_norm else \
            f"self.{ck.post_attention_norm}(residual)"
        return [*lines,
                *call(8, "attn_out = ", f"self.{ck.attention}",
                      ["positions", "hidden_states", "kv_cache", "attn_metadata"]),
                f"        hidden_states = attn_out + self.{ck.mlp}({mlp_in})", *scale,
                "        return hidden_states, residual"]
    mlp_norm = ck.pre_mlp_norm if where == "sandwich" else ck.post_attention_norm
    return [*lines, *attn, *scale,
            *call(8, "hidden_states, residual = ", f"self.{mlp_norm}",
                   ["hidden_states", "residual"]), *done]


def model_class(spec: ModelSpec, n: Names) -> list[str]:
    a, c, ck = spec.arch, spec.arch.config, spec.arch.checkpoint
    lines = [
        f"class {n.prefix}Model(nn.Module):",
        "    def __init__(self, config, linear_method: LinearMethod | None) -> None:",
        "        super().__init__()",
    ]
    lines.append(f"        hidden_size = {config_expr(c.hidden_size)}")
    lines += call(8, f"self.{ck.embed_tokens} = ", "VocabParallelEmbedding",
                   [config_expr(c.vocab_size), "hidden_size"])
    layers = (f"{n.prefix}DecoderLayer(config, i, linear_method) for i in range("
              f"{config_expr(c.num_layers)})")
    lines += call(8, f"self.{ck.layers} = ", "nn.ModuleList", [layers])
    lines += call(8, f"self.{ck.final_norm} = ", norm_expr(spec, "", "").partition("(")[0],
                   norm_expr(spec, "hidden_size", config_expr(c.norm_eps))
                   .partition("(")[2].removesuffix(")").split(", "))
    scale = []
    if a.embedding.scale == "sqrt_hidden":
        lines.append("        # sqrt(hidden) rounded to the model's dtype, as HF rounds it")
        lines += call(8, "self.embed_scale = ", "torch.tensor", [
            "hidden_size**0.5", "dtype=torch.get_default_dtype()"], ".item()")
        scale.append(" * self.embed_scale")
    if c.embedding_multiplier is not None:
        lines.append(f"        self.embedding_multiplier = {config_expr(c.embedding_multiplier)}")
        scale.append(" * self.embedding_multiplier")
    lines += ["", *forward_sig(["input_ids", "positions", "kv_caches", "attn_metadata"],
                                "torch.Tensor")]
    lines.append(f"        hidden_states = self.{ck.embed_tokens}(input_ids){''.join(scale)}"
                 "  # [T, hidden]")
    lines += [
        "        residual = None",
        f"        for layer, kv_cache in zip(self.{ck.layers}, kv_caches):",
        *call(12, "hidden_states, residual = ", "layer", [
            "positions", "hidden_states", "residual", "kv_cache", "attn_metadata"]),
        f"        return self.{ck.final_norm}(hidden_states, residual)[0]"]
    return lines


def causal_lm_class(spec: ModelSpec, n: Names) -> list[str]:
    from engine.models.blocks import packed_modules_for

    a, c, ck = spec.arch, spec.arch.config, spec.arch.checkpoint
    qkv = "qkv_proj" if ck.qkv_layout == "separate" else ck.qkv
    packed = packed_modules_for(a)
    lines = [f"class {n.arch}(nn.Module):"]
    if packed:
        lines += [
            "    # checkpoint name piece -> (our fused parameter, shard id); the fused layer's",
            "    # weight_loader puts each piece in place, this rank's slice of it only"]
        lines += dict_lines(4, "packed_modules: ClassVar[dict[str, tuple[str, int | str]]] = ",
                             packed)
    lines += [
        "    # `aphro parity-check " + n.arch + "` with no checkpoint builds a tiny random",
        "    # one of this HF model_type and config; transformers' code for it is the reference",
        f"    hf_model_type = {json.dumps(n.model_type)}"]
    lines += dict_lines(4, "tiny_config: ClassVar[dict] = ", spec.tiny)
    lines += [
        "",
        "    def __init__(self, config, linear_method: LinearMethod | None = None) -> None:",
        "        super().__init__()",
        "        self.config = config",
        f"        self.{ck.model} = {n.prefix}Model(config, linear_method)"]
    head_args = [config_expr(c.vocab_size), config_expr(c.hidden_size)]
    if c.lm_head_bias is not None:
        head_args.append(f"bias={config_expr(c.lm_head_bias, 'False')}")
    lines += call(8, f"self.{ck.lm_head} = ", "ParallelLMHead", head_args)
    lines += [
        f"        self.tie_word_embeddings = bool({config_expr(c.tie_word_embeddings, 'False')})",
        "        if self.tie_word_embeddings:",
        f"            self.{ck.lm_head}.weight = self.{ck.model}.{ck.embed_tokens}.weight"]
    if ck.lm_head != "lm_head" or ck.embed_tokens != "embed_tokens":
        lines += [
            "        # tied: a checkpoint's own head tensor must equal the embedding (load_params)",
            f'        self.lm_head_weight_name = "{ck.lm_head}.weight"',
            f'        self.embed_weight_name = "{ck.model}.{ck.embed_tokens}.weight"']
    logits = [config_expr(c.vocab_size)]
    scale = [f"{config_expr(c.logit_scale)}"] if c.logit_scale is not None else []
    if c.logit_divisor is not None:
        scale = [f"{scale[0] if scale else '1.0'} / {config_expr(c.logit_divisor)}"]
    logits += [f"scale={s}" for s in scale]
    if c.final_logit_softcap is not None:
        logits.append(f"soft_cap={config_expr(c.final_logit_softcap, 'None')}")
    lines += call(8, "self.logits_processor = ", "LogitsProcessor", logits)
    lines += [
        "        # what the runner reads to size the KV cache (layers, this rank's KV heads)",
        f"        attn = self.{ck.model}.{ck.layers}[0].{ck.attention}",
        f"        self.num_layers = len(self.{ck.model}.{ck.layers})",
        f"        self.num_kv_heads = attn.{qkv}.num_kv_heads",
        "        self.head_dim = attn.head_dim",
        "",
        *forward_sig(["input_ids", "positions", "kv_caches", "attn_metadata"], "torch.Tensor"),
        f"        return self.{ck.model}(input_ids, positions, kv_caches, attn_metadata)",
        "",
        "    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:",
        "        # [N, hidden] -> float32 [N, vocab], gathered across ranks",
        f"        return self.logits_processor(self.{ck.lm_head}, hidden_states)",
        "",
        "    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> LoadTracker:",
        "        # each checkpoint tensor into its parameter (fused ones through packed_modules);",
        "        # the tracker names every tensor missing, unused or misshaped",
        *call(8, "return ", "load_params", [
            "self", "weights", "self.packed_modules" if packed else "{}",
            f"skip={literal(tuple(ck.ignore))}"])]
    return lines
