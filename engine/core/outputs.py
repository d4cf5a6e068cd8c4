"""What generate() returns, in vLLM's shape; EngineStats, what LLMEngine.stats() reports."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[dict[int, float]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[dict[int, float] | None] | None = None
    finished: bool = False
    metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load (LLMEngine.stats(); the server's /metrics)."""

    num_requests_running: int  # requests with a sequence scheduled (holding KV blocks)
    num_requests_waiting: int  # requests with every sequence still queued
    kv_cache_usage: float  # share of KV blocks held by live sequences, 0..1
    num_kv_blocks: int
