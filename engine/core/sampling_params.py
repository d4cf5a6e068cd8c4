"""Per-request sampling settings, validated on construction (vLLM's names and meanings)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.errors import RequestError

_EPS = 1e-5


@dataclass
class SamplingParams:
    """How to pick tokens for one request.

    temperature=0 is greedy. top_k=-1 (or 0) and top_p=1 and min_p=0 disable those filters.
    Penalties follow the OpenAI API (presence, frequency: additive on output tokens) and the CTRL
    paper (repetition: divides positive logits, multiplies negative ones, prompt and output tokens).
    `logprobs=k` returns the sampled token's logprob and the top-k; `prompt_logprobs=k` the same for
    every prompt token after the first.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stop_strs: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._check_types()
        self.stop_strs = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()
        if self.temperature < _EPS:
            self.temperature = 0.0

    def _check_types(self) -> None:
        """Types first, so a wrong type is a RequestError naming the field, not a TypeError."""
        floats = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty")
        for name in floats:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise RequestError(f"SamplingParams.{name}={value!r}: must be a finite number")
        for name in ("n", "top_k", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs",
                     "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (value is None or isinstance(value, int)):
                raise RequestError(f"SamplingParams.{name}={value!r}: must be an integer")
        if not (self.stop is None or isinstance(self.stop, (str, list, tuple))):
            raise RequestError(f"SamplingParams.stop={self.stop!r}: must be a string or a list "
                               "of strings")
        if not (self.stop_token_ids is None or isinstance(self.stop_token_ids, (list, tuple))) \
                or any(isinstance(t, bool) for t in self.stop_token_ids or []):
            raise RequestError(f"SamplingParams.stop_token_ids={self.stop_token_ids!r}: must be "
                               "a list of token ids")

    def _validate(self) -> None:
        def bad(name: str, expected: str) -> RequestError:
            return RequestError(f"SamplingParams.{name}={getattr(self, name)!r}: {expected}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or (self.top_k < -1):
            raise bad("top_k", "must be -1 or 0 (disabled) or a positive integer")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0 (1 disables it)")
        if not -2 <= self.presence_penalty <= 2:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int)
                                            or self.max_tokens < 1):
            raise bad("max_tokens", "must be a positive integer or None")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise bad("logprobs", "must be None or an integer >= 0")
        if self.prompt_logprobs is not None and (not isinstance(self.prompt_logprobs, int)
                                                 or self.prompt_logprobs < 0):
            raise bad("prompt_logprobs", "must be None or an integer >= 0")
        if any(not isinstance(s, str) or not s for s in self.stop_strs):
            raise bad("stop", "must be a non-empty string or a list of non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of non-negative token ids")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "must be an integer or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def do_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)
