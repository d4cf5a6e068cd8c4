"""aphro's embedded paged-attention inference engine."""

from engine.errors import AphroError
from engine.models.registry import register_model
from engine.sampling_params import SamplingParams


def __getattr__(name: str):
    # LLM pulls in the whole engine; import it on first use
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    if name == "LLMEngine":
        from engine.llm_engine import LLMEngine

        return LLMEngine
    raise AttributeError(name)


__all__ = ["LLM", "AphroError", "LLMEngine", "SamplingParams", "register_model"]
