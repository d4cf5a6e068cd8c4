"""The explicit file's attention and MLP classes, wired from engine/layers as the family's
spec says."""

from __future__ import annotations

from engine.spec.explicit.code import Names, call, config_expr, forward_sig, norm_expr, paren
from engine.spec.schema import ModelSpec


def attention_class(spec: ModelSpec, n: Names) -> list[str]:
    a, c, ck = spec.arch, spec.arch.config, spec.arch.checkpoint
    qkv = "qkv_proj" if ck.qkv_layout == "separate" else ck.qkv
    kv = {"mha": "num_heads", "mqa": "1"}.get(a.attention.kind) or config_expr(c.num_kv_heads)
    lines = [
        f"class {n.prefix}Attention(nn.Module):",
        ("    def __init__(self, config, layer_idx: int, linear_method: LinearMethod | None)"
         " -> None:"),
        "        super().__init__()",
        f"        hidden_size = {config_expr(c.hidden_size)}",
        f"        num_heads = {config_expr(c.num_heads)}",
        f"        num_kv_heads = {kv}",
        f"        self.head_dim = {config_expr(c.head_dim, 'hidden_size // num_heads')}",
        "        # q, k and v in one column-parallel matmul: this rank holds its heads' rows",
    ]
    lines += call(8, f"self.{qkv} = ", "QKVParallelLinear", [
        "hidden_size", "self.head_dim", "num_heads", "num_kv_heads",
        f"bias={config_expr(c.qkv_bias, 'False')}", "linear_method=linear_method"])
    lines += call(8, f"self.{ck.o_proj} = ", "RowParallelLinear", [
        "num_heads * self.head_dim", "hidden_size", f"bias={config_expr(c.o_bias, 'False')}",
        "linear_method=linear_method"])
    lines.append(f"        self.q_size, self.kv_size = self.{qkv}.q_size, self.{qkv}.kv_size")
    eps = config_expr(c.norm_eps)
    if a.attention.qk_norm and a.attention.qk_norm_scope == "per_head":
        lines.append("        # one norm of head_dim, shared by every head")
        lines.append(f"        self.{ck.q_norm} = {norm_expr(spec, 'self.head_dim', eps)}")
        lines.append(f"        self.{ck.k_norm} = {norm_expr(spec, 'self.head_dim', eps)}")
    elif a.attention.qk_norm:
        offset = ", weight_offset=1.0" if a.norm.kind == "rms_one_plus" else ""
        lines.append("        # one norm over all heads at once, its weight cut like the heads")
        lines += call(8, f"self.{ck.q_norm} = ", "ShardedRMSNorm", [
            "num_heads * self.head_dim", "self.q_size", f"{eps}{offset}"])
        lines += call(8, f"self.{ck.k_norm} = ", "ShardedRMSNorm", [
            "num_kv_heads * self.head_dim", "self.kv_size", eps,
            f"self.{qkv}.num_kv_head_replicas{offset}"])
    if a.position.kind == "rope":
        lines.append("        rope = rope_params_from_config(config)  # base and scaling")
        if c.rotary_dim is not None:
            rot = config_expr(c.rotary_dim, "self.head_dim")
        else:
            lines.append('        share = rope.get("partial_rotary_factor", 1.0)  # of each head')
            if c.partial_rotary_factor is not None:
                lines.append(f"        share = {config_expr(c.partial_rotary_factor, 'share')}")
            rot = "int(self.head_dim * share)"
        lines.append(f"        rotary_dim = {rot}")
        lines += call(8, "self.rotary_emb = ", "get_rope", [
            "self.head_dim", "rotary_dim", config_expr(c.max_position), "rope",
            f"is_neox_style={a.position.rope_style == 'neox'}"])
    if c.attention_multiplier is not None:
        lines.append(f"        scale = {config_expr(c.attention_multiplier)}")
    elif c.query_pre_attn_scalar is not None:
        scalar = paren(config_expr(c.query_pre_attn_scalar, "self.head_dim"))
        lines.append(f"        scale = {scalar} ** -0.5" if "(" in scalar else
                     f"        scale = {scalar}**-0.5")
    else:
        lines.append("        scale = self.head_dim**-0.5")
    args = [f"self.{qkv}.num_heads", "self.head_dim", "scale", f"self.{qkv}.num_kv_heads"]
    if c.sliding_window is not None:
        lines.append(f"        window = {config_expr(c.sliding_window, 'None')}")
        if c.layer_types is not None:
            types = config_expr(c.layer_types)
            lines.append(f'        if {types}[layer_idx] != "sliding_attention":')
            lines.append("            window = None  # a global-attention layer")
        args.append("sliding_window=window")
    if c.attn_logit_softcap is not None:
        args.append(f"logits_soft_cap={config_expr(c.attn_logit_softcap, 'None')}")
    lines.append("        # this rank's heads, reading and writing the paged KV cache")
    lines += call(8, "self.attn = ", "PagedAttention", args)
    lines += ["", *forward_sig(["positions", "hidden_states", "kv_cache", "attn_metadata"],
                                "torch.Tensor")]
    lines.append(f"        qkv = self.{qkv}(hidden_states)  # [T, q_size + 2 * kv_size]")
    lines.append("        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)")
    if a.attention.qk_norm and a.attention.qk_norm_scope == "per_head":
        lines += [
            f"        q = self.{ck.q_norm}(q.reshape(-1, self.head_dim)).view(q.shape)",
            f"        k = self.{ck.k_norm}(k.reshape(-1, self.head_dim)).view(k.shape)"]
    elif a.attention.qk_norm:
        lines.append(f"        q, k = self.{ck.q_norm}(q), self.{ck.k_norm}(k)")
    if a.position.kind == "rope":
        lines += [
            "        # q and k are rotated in the kernel that writes the KV cache (the same values",
            "        # as q, k = self.rotary_emb(positions, q, k, attn_metadata.long_rope) first)",
            "        out = self.attn(",
            "            q, k, v, kv_cache, attn_metadata, rotary=self.rotary_emb, positions=positions",
            "        )  # [T, heads * dim]"]
    else:
        lines.append("        out = self.attn(q, k, v, kv_cache, attn_metadata)  # [T, heads * dim]")
    lines.append(f"        return self.{ck.o_proj}(out)")
    return lines


def mlp_class(spec: ModelSpec, n: Names) -> list[str]:
    c, ck = spec.arch.config, spec.arch.checkpoint
    lines = [
        f"class {n.prefix}MLP(nn.Module):",
        "    def __init__(self, config, linear_method: LinearMethod | None) -> None:",
        "        super().__init__()",
        f"        hidden_size = {config_expr(c.hidden_size)}",
        f"        intermediate_size = {config_expr(c.intermediate_size, '4 * hidden_size')}",
        f"        bias = {config_expr(c.mlp_bias, 'False')}",
    ]
    if spec.arch.mlp.kind == "gated":
        gate_up = "gate_up_proj" if isinstance(ck.gate_up, tuple) else ck.gate_up
        lines.append("        # gate and up in one column-parallel matmul")
        lines += call(8, f"self.{gate_up} = ", "MergedColumnParallelLinear", [
            "hidden_size", "[intermediate_size] * 2", "bias=bias", "linear_method=linear_method"])
        lines += call(8, f"self.{ck.down} = ", "RowParallelLinear", [
            "intermediate_size", "hidden_size", "bias=bias", "linear_method=linear_method"])
        lines.append("        # act(gate) * up, fused")
        lines += call(8, "self.act_fn = ", "get_gated_act", [config_expr(c.activation)])
        body = f"        return self.{ck.down}(self.act_fn(self.{gate_up}(x)))"
    else:
        lines += call(8, f"self.{ck.fc_in} = ", "ColumnParallelLinear", [
            "hidden_size", "intermediate_size", "bias=bias", "linear_method=linear_method"])
        lines += call(8, f"self.{ck.fc_out} = ", "RowParallelLinear", [
            "intermediate_size", "hidden_size", "bias=bias", "linear_method=linear_method"])
        lines += call(8, "self.act_fn = ", "get_act_fn", [config_expr(c.activation)])
        body = f"        return self.{ck.fc_out}(self.act_fn(self.{ck.fc_in}(x)))"
    return [*lines, "", "    def forward(self, x: torch.Tensor) -> torch.Tensor:", body]
