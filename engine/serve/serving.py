"""What every endpoint shares: the engine, the server's own tokenizer, the served names, the
limits, and the checks that turn a request into engine requests (or a 400 that says why)."""

from __future__ import annotations

import functools
import math
import re
import time
import uuid
from dataclasses import dataclass, field

from engine.checkpoint.files import load_tokenizer
from engine.core.detokenizer import decoder_of
from engine.core.sampling_params import SamplingParams
from engine.errors import AphroError, ConfigError
from engine.serve.async_llm import AsyncLLM
from engine.serve.chat import ChatTemplate, special_tokens_of
from engine.serve.protocol import APIError, SamplingRequest
from engine.serve.streams import EngineRequest, RequestStream

_MIN_LOGPROB = -9999.0  # stands for -inf / nan: JSON has neither (vLLM's choice)
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces


@dataclass(frozen=True)
class ServerLimits:
    max_n: int = 128  # completions per prompt
    max_stop: int = 16  # stop strings, and stop token ids, per request
    max_prompts: int = 1024  # prompts in one /v1/completions request
    max_body_bytes: int = 16 << 20  # 413 above this
    max_header_bytes: int = 16 << 10  # request line + headers (uvicorn's h11 limit)


@dataclass(frozen=True)
class ServeOptions:
    served_model_names: tuple[str, ...]
    api_key: str | None = None
    chat_template: str | None = None  # the template's source (chat.find_chat_template)
    limits: ServerLimits = field(default_factory=ServerLimits)

    def __post_init__(self) -> None:
        if not self.served_model_names or not all(self.served_model_names):
            raise ConfigError("served_model_names: give at least one non-empty name")


class Serving:
    """Built once per server over a started AsyncLLM."""

    def __init__(self, llm: AsyncLLM, options: ServeOptions) -> None:
        self.llm, self.options, self.limits = llm, options, options.limits
        config = llm.config
        self.model_path, self.max_model_len = config.model, config.max_model_len
        self.vocab_size = config.vocab_size
        # its own instance: the engine core (another process) has the engine's
        self.tokenizer = load_tokenizer(config.model)
        self._decode = decoder_of(self.tokenizer) if self.tokenizer is not None else None
        self.chat_template = (ChatTemplate(options.chat_template,
                                           special_tokens_of(self.tokenizer))
                              if options.chat_template and self.tokenizer is not None else None)
        self.token_text = functools.lru_cache(maxsize=1 << 16)(self._token_text)
        self.created = int(time.time())
        self.draining = False  # set on SIGTERM: new requests get 503

    @property
    def model_name(self) -> str:
        return self.options.served_model_names[0]

    def check_model(self, name: str | None) -> None:
        if name and name not in self.options.served_model_names:
            raise APIError(404, f"the model {name!r} does not exist here; this server serves "
                           f"{', '.join(self.options.served_model_names)} (GET /v1/models)",
                           "model", "model_not_found")

    def check_accepting(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down: retry on another server")
        if not self.llm.is_running:
            raise APIError(503, f"the engine has stopped ({self.llm.error or 'closed'})")

    def need_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise APIError(400, "this checkpoint has no tokenizer: send prompts as token ids",
                           "prompt")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.need_tokenizer()
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int]) -> str:
        """/detokenize: ids checked against the vocabulary, then their text."""
        self.need_tokenizer()
        self.check_token_ids(ids, "tokens")
        return self.text(ids)

    def text(self, ids: list[int]) -> str:
        """The text of ids already checked ("" without a tokenizer), special tokens kept."""
        return self._decode(ids, False) if self._decode is not None else ""

    def check_token_ids(self, ids: list[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary "
                           f"[0, {self.vocab_size})", param)

    def check_prompt(self, ids: list[int], max_tokens: int | None,
                     field: str = "prompt") -> int:
        """Raise a 400 for an empty prompt, unknown ids or one that leaves max_tokens no
        room; returns max_tokens (None: the rest of the context). `field`: the request's
        name for the prompt (chat: "messages")."""
        if not ids:
            raise APIError(400, "the prompt is empty", field)
        self.check_token_ids(ids, "prompt")
        room = self.max_model_len - len(ids)
        if max_tokens is None and room < 1:  # no max_tokens: the prompt alone is too long
            raise APIError(400, f"this model's maximum context length is {self.max_model_len} "
                           f"tokens, but the prompt has {len(ids)} tokens, which leaves no room "
                           "to generate: shorten the prompt", field, "context_length_exceeded")
        if max_tokens is None:
            max_tokens = room
        if room < 1 or max_tokens > room:
            raise APIError(400, f"this model's maximum context length is {self.max_model_len} "
                           f"tokens, but the prompt has {len(ids)} tokens and max_tokens asks "
                           f"for {max_tokens} more ({len(ids) + max_tokens}): shorten the "
                           "prompt or lower max_tokens", "max_tokens", "context_length_exceeded")
        return max_tokens

    def sampling_params(self, req: SamplingRequest, max_tokens: int, logprobs: int | None,
                        prompt_logprobs: int | None) -> SamplingParams:
        lim = self.limits
        if req.n > lim.max_n:
            raise APIError(400, f"n={req.n}: at most {lim.max_n} completions per prompt", "n")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        for name, values in (("stop", stops), ("stop_token_ids", req.stop_token_ids or [])):
            if len(values) > lim.max_stop:
                raise APIError(400, f"{name} has {len(values)} entries: at most "
                               f"{lim.max_stop}", name)
        for name, k in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if k is not None and k > self.llm.config.max_logprobs:
                raise APIError(400, f"{name}={k} is more than this server's max_logprobs="
                               f"{self.llm.config.max_logprobs} (aphro serve --max-logprobs)",
                               "logprobs")
        try:
            return SamplingParams(
                n=req.n, temperature=1.0 if req.temperature is None else req.temperature,
                top_p=req.top_p, top_k=-1 if req.top_k is None else req.top_k,
                min_p=req.min_p, repetition_penalty=req.repetition_penalty,
                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                seed=req.seed, max_tokens=max_tokens, min_tokens=req.min_tokens,
                stop=stops, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
                logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                skip_special_tokens=req.skip_special_tokens,
                include_stop_str_in_output=req.include_stop_str_in_output)
        except AphroError as e:
            raise bad_request(e) from None

    @staticmethod
    def request_id(headers) -> str:
        """The client's x-request-id when it sent a usable one, else a fresh id."""
        given = headers.get("x-request-id")
        if given is not None and _REQUEST_ID.fullmatch(given):
            return given
        return uuid.uuid4().hex

    async def start(self, requests: list[EngineRequest]) -> RequestStream:
        self.check_accepting()
        try:
            return await self.llm.add_requests(requests)
        except AphroError as e:
            raise bad_request(e) from None

    # -- logprobs ------------------------------------------------------------------------------
    def _token_text(self, token_id: int) -> str:
        return self._decode([token_id], False) if self._decode is not None else str(token_id)

    @staticmethod
    def clean(logprob: float) -> float:
        return logprob if math.isfinite(logprob) else _MIN_LOGPROB

    def completion_logprobs(self, token_ids: list[int], entries: list, offset: int = 0) -> dict:
        """OpenAI's completions `logprobs` for tokens and their {id: logprob} entries (the
        token's own first; None for a prompt's first token)."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tid, entry in zip(token_ids, entries):
            text = self.token_text(tid)
            out["tokens"].append(text)
            out["text_offset"].append(offset)
            offset += len(text)
            if entry is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(self.clean(entry.get(tid, next(iter(entry.values())))))
            out["top_logprobs"].append({self.token_text(t): self.clean(v)
                                        for t, v in entry.items()})
        return out

    def chat_logprobs(self, token_ids: list[int], entries: list, top: int) -> list[dict]:
        """OpenAI's chat `logprobs.content` items (top: how many top_logprobs each)."""
        items = []
        for tid, entry in zip(token_ids, entries):
            best = sorted(entry.items(), key=lambda kv: -kv[1])[:top]
            items.append({**self._chat_token(tid, entry.get(tid, 0.0)),
                          "top_logprobs": [self._chat_token(t, v) for t, v in best]})
        return items

    def _chat_token(self, token_id: int, logprob: float) -> dict:
        text = self.token_text(token_id)
        return {"token": text, "logprob": self.clean(logprob),
                "bytes": list(text.encode("utf-8"))}


def bad_request(e: AphroError) -> APIError:
    """A RequestError (or ConfigError) from the engine as a 400 naming the field."""
    message = str(e)
    m = re.match(r"SamplingParams\.(\w+)=", message)
    if m:
        message = message[len("SamplingParams."):]
    return APIError(400, message, m.group(1) if m else None)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
