"""The offline API: `LLM(model=...).generate(prompts, SamplingParams(...))`, as in vLLM."""

from __future__ import annotations

from collections.abc import Sequence as Seq

from engine.config import EngineConfig
from engine.core.llm_engine import LLMEngine
from engine.core.outputs import RequestOutput
from engine.core.sampling_params import SamplingParams
from engine.errors import RequestError


class LLM:
    """`LLM(model, **options)`: options as EngineConfig.create takes them (dtype, device,
    max_model_len, block_size, max_num_seqs, max_num_batched_tokens, enable_prefix_caching,
    enable_chunked_prefill, kv_cache_bytes, num_kv_blocks, gpu_memory_utilization, seed,
    tensor_parallel_size, enforce_eager, load_format, ...)."""

    def __init__(self, model: str, **options) -> None:
        self.engine = LLMEngine(EngineConfig.create(model, **options), stream_outputs=False)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | Seq[str] | None = None,
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 prompt_token_ids: Seq[Seq[int]] | None = None) -> list[RequestOutput]:
        """One RequestOutput per prompt, in the order given."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if prompts is None and prompt_token_ids is None:
            raise RequestError("generate() needs prompts or prompt_token_ids")
        n = len(prompts) if prompts is not None else len(prompt_token_ids)
        if prompts is not None and prompt_token_ids is not None and len(prompt_token_ids) != n:
            raise RequestError("prompts and prompt_token_ids have different lengths")
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = ([sampling_params] * n if isinstance(sampling_params, SamplingParams)
                  else list(sampling_params))
        if len(params) != n:
            raise RequestError(f"{len(params)} sampling params for {n} prompts")
        ids = []
        try:
            for i in range(n):
                ids.append(self.engine.add_request(
                    prompts[i] if prompts is not None else None, params[i],
                    prompt_token_ids[i] if prompt_token_ids is not None else None))
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self._run(ids)

    def _run(self, request_ids: list[str]) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        results[out.request_id] = out
        except BaseException:  # Ctrl-C or a failed step: free the blocks, keep the engine usable
            for rid in request_ids:
                if rid not in results:
                    self.engine.abort_request(rid)
            raise
        return [results[rid] for rid in request_ids]

    def close(self) -> None:
        """Free the model and KV cache; with tensor parallelism stop and join the worker
        processes. The LLM is unusable afterwards."""
        self.engine.close()

    def __enter__(self) -> LLM:  # noqa: PYI034 (Self needs Python 3.11)
        return self

    def __exit__(self, *exc) -> None:
        self.close()
