"""aphro's embedded paged-attention inference engine.

The tree is the architecture (docs/ARCHITECTURE.md walks one request through it):

    config.py     EngineConfig: every option resolved once
    core/         the serving core: LLM, LLMEngine, scheduler, block manager, sequences, sampling
                  params, outputs, the step batch
    distributed/  the executor: the model runner in-process (TP=1) or worker processes (TP>1)
    runner/       one rank's model runner: model, KV cache, CUDA graphs, sampler, observer hook
    layers/       the layers models are built from (parallel linear, attention, rotary, norms)
    models/       the registry, the shared blocks and the model files
    checkpoint/   reading HF checkpoint folders; load reports; random weights
    spec/         model specs: schema, loader, generator
    validate/     parity with HF transformers, localization, the sharding check, tiny models
    serve/        the OpenAI-compatible server: AsyncLLM, routes, metrics (`aphro serve`)
    bench/        benchmarks
"""

from engine.core.sampling_params import SamplingParams
from engine.errors import AphroError
from engine.models.registry import register_model


def __getattr__(name: str):
    # LLM pulls in the whole engine; import it on first use
    if name == "LLM":
        from engine.core.llm import LLM

        return LLM
    if name == "LLMEngine":
        from engine.core.llm_engine import LLMEngine

        return LLMEngine
    if name == "EngineConfig":
        from engine.config import EngineConfig

        return EngineConfig
    raise AttributeError(name)


__all__ = ["LLM", "AphroError", "EngineConfig", "LLMEngine", "SamplingParams", "register_model"]
