"""The layers every model is built from. Tensor-parallel layers own their shard of each weight
and a `weight_loader` that cuts it from the full checkpoint tensor; models never slice weights.

    linear.py            Replicated/Column/Merged/QKV/RowParallelLinear and their loaders
    linear_method.py     LinearMethod (the quantization hook), UnquantizedLinearMethod,
                         linear_param (how a parameter is sharded)
    vocab_embedding.py   VocabParallelEmbedding, ParallelLMHead
    logits.py            LogitsProcessor: hidden states -> logits (gathered, scaled, capped)
    attention.py         PagedAttention (writes the step's K/V to the paged cache, attends)
    attention_metadata.py  AttentionMetadata: the step's slot mapping, block tables, lengths
    rotary.py            rotary embeddings with HF's scaling schemes
    layernorm.py         RMSNorm (fused residual add), LayerNorm, ShardedRMSNorm (one norm
                         over a vector split across ranks)
    activation.py        SiluAndMul, GeluAndMul, plain activations
    moe.py               fused mixture of experts
    sharding.py          ShardSpec: how each parameter is split across ranks
    quantization/        the LinearMethods of each scheme (fp8, int8, compressed-tensors), the
                         scheme registry and checkpoint quantization_config parsing
"""
