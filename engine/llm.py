"""The offline API: `LLM(model=...).generate(prompts, SamplingParams(...))`, as in vLLM."""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from engine.config import CacheConfig, SchedulerConfig
from engine.errors import RequestError
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.worker import WorkerConfig


class LLM:
    def __init__(self, model: str, dtype: str | torch.dtype = "auto", device: str = "auto",
                 max_model_len: int | None = None, block_size: int = 16,
                 max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                 enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True,
                 kv_cache_bytes: int | None = None, num_kv_blocks: int | None = None,
                 gpu_memory_utilization: float = 0.9, seed: int = 0,
                 tensor_parallel_size: int = 1, enforce_eager: bool = False) -> None:
        from engine.worker import load_config

        hf_config = load_config(model)
        model_max = getattr(hf_config, "max_position_embeddings", None) or \
            getattr(hf_config, "n_positions", None) or 2048
        max_model_len = max_model_len or model_max
        batched = max_num_batched_tokens or max(8192, max_model_len if not enable_chunked_prefill
                                                else 0)
        worker_cfg = WorkerConfig(model=model, dtype=dtype, device=device,
                                  max_model_len=max_model_len, seed=seed,
                                  max_num_seqs=max_num_seqs, max_num_batched_tokens=batched,
                                  tensor_parallel_size=tensor_parallel_size,
                                  enforce_eager=enforce_eager)
        self.engine = LLMEngine(
            worker_cfg,
            SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=batched,
                            max_model_len=max_model_len,
                            enable_chunked_prefill=enable_chunked_prefill),
            CacheConfig(block_size=block_size, enable_prefix_caching=enable_prefix_caching,
                        gpu_memory_utilization=gpu_memory_utilization,
                        kv_cache_bytes=kv_cache_bytes, num_blocks=num_kv_blocks),
            stream_outputs=False)

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
        """Free the model and KV cache on every rank; the LLM is unusable afterwards.
        Tensor-parallel workers stay parked for the next LLM of the same size in this process
        and stop at exit (engine.rank_group.close_idle_groups stops them now)."""
        self.engine.close()

    def __enter__(self) -> LLM:  # noqa: PYI034 (Self needs Python 3.11)
        return self

    def __exit__(self, *exc) -> None:
        self.close()
