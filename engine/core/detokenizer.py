"""Incremental detokenization and stop-string handling for one sequence."""

from __future__ import annotations

from collections.abc import Callable

from engine.core.sequence import Sequence

Decode = Callable[[list[int], bool], str]  # (ids, skip_special_tokens) -> text


def decoder_of(tokenizer) -> Decode:
    """`tokenizer.decode(ids, skip_special_tokens=...)` as a plain function of (ids, skip).

    For a fast tokenizer that cleans up no spaces, that is its Rust tokenizer's decode, called
    directly: transformers' wrapper around it costs ~5 µs a call, several times the decode of
    the few tokens an incremental step decodes, twice per token of every sequence. The direct
    call is used only if it gives the wrapper's text on a probe of the vocabulary."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True) \
            and callable(getattr(backend, "decode", None)):
        probe = list(range(min(len(tokenizer), 512)))
        try:
            same = all(backend.decode(probe, skip_special_tokens=skip)
                       == tokenizer.decode(probe, skip_special_tokens=skip)
                       for skip in (False, True))
        except Exception:  # noqa: BLE001 - any failure: keep the wrapper
            same = False
        if same:
            return lambda ids, skip: backend.decode(ids, skip_special_tokens=skip)
    return lambda ids, skip: tokenizer.decode(ids, skip_special_tokens=skip)


class IncrementalDetokenizer:
    """Decodes only a short window of tokens per step; emits text once it stops changing
    (no trailing replacement character from a partial UTF-8 sequence). `decode` is
    decoder_of(tokenizer), made once per engine."""

    __slots__ = ("decode", "prefix_offset", "read_offset", "skip_special")

    def __init__(self, decode: Decode, skip_special_tokens: bool = True) -> None:
        self.decode, self.skip_special = decode, skip_special_tokens
        self.prefix_offset = 0
        self.read_offset = 0

    def step(self, output_ids: list[int]) -> str:
        """New text for output_ids (which grew by at least one token since the last call)."""
        decode, skip = self.decode, self.skip_special
        prefix = decode(output_ids[self.prefix_offset:self.read_offset], skip) \
            if self.read_offset > self.prefix_offset else ""
        full = decode(output_ids[self.prefix_offset:], skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(output_ids)
            return full[len(prefix):]
        return ""

    def flush(self, output_ids: list[int]) -> str:
        """The text step() still holds back (a trailing partial character), when the sequence
        has ended: the streamed text then equals one decode of all the tokens."""
        decode, skip = self.decode, self.skip_special
        prefix = decode(output_ids[self.prefix_offset:self.read_offset], skip)
        full = decode(output_ids[self.prefix_offset:], skip)
        self.prefix_offset = self.read_offset = len(output_ids)
        return full[len(prefix):]


def find_stop_string(seq: Sequence, new_chars: int) -> str | None:
    """If a stop string appears in the text added by the last `new_chars` characters, cut the
    text there (keeping the stop string only if asked) and return it."""
    params = seq.sampling_params
    text = seq.output_text
    for stop in params.stop_strs:
        start = max(0, len(text) - new_chars - len(stop) + 1)
        idx = text.find(stop, start)
        if idx != -1:
            end = idx + len(stop) if params.include_stop_str_in_output else idx
            seq.output_text = text[:end]
            return stop
    return None


def visible_text(seq: Sequence) -> str:
    """Text safe to show while running: holds back a tail that could begin a stop string."""
    text = seq.output_text
    if seq.is_finished or not seq.sampling_params.stop_strs:
        return text
    hold = 0
    for stop in seq.sampling_params.stop_strs:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return text[: len(text) - hold]
