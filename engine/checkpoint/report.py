"""What a model's load_weights did with each checkpoint tensor: `LoadTracker` records it,
`WeightReport` names every tensor missing, unused or misshaped; a mismatch raises CheckpointError
unless loading runs inside `non_strict_loading()` (parity-check does, to report them all)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.errors import CheckpointError

_MAX_LISTED = 20


def name_list(names: list[str], limit: int = _MAX_LISTED) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


@dataclass
class WeightReport:
    """Checkpoint tensors vs model parameters, by name."""

    missing: list[str] = field(default_factory=list)  # expected, never loaded
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, unused
    misshaped: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(
        default_factory=list)  # (name, expected shape, got shape)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.misshaped)

    def as_dict(self) -> dict:
        return {"missing": list(self.missing), "unexpected": list(self.unexpected),
                "misshaped": [{"name": n, "expected": list(e), "got": list(g)}
                              for n, e, g in self.misshaped]}

    def error_message(self, model_name: str) -> str:
        counts = (f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
                  f"{len(self.misshaped)} misshaped tensors")
        lines = [f"{model_name}: the checkpoint does not match the model ({counts})"]
        if self.missing:
            lines.append(f"  missing: {name_list(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected: {name_list(self.unexpected)}")
        if self.misshaped:
            shown = [f"{n} (expected {list(e)}, got {list(g)})" for n, e, g in self.misshaped]
            lines.append(f"  misshaped: {name_list(shown)}")
        lines.append("  check that config.json's architectures match this checkpoint and that the "
                     "model's checkpoint-name mapping is right")
        return "\n".join(lines)

    def raise_if_errors(self, model_name: str) -> None:
        if not self.ok and _strict_loading.get():
            raise CheckpointError(self.error_message(model_name), report=self)


_strict_loading = contextvars.ContextVar("aphro_strict_loading", default=True)


@contextlib.contextmanager
def non_strict_loading() -> Iterator[None]:
    """Let load_weights finish on a checkpoint that does not match the model, so the tracker it
    returns names every missing, unused and misshaped tensor (normally the mismatch raises
    CheckpointError). Scoped to this context (and thread)."""
    token = _strict_loading.set(False)
    try:
        yield
    finally:
        _strict_loading.reset(token)


def check_loaded(expected: Mapping[str, tuple[int, ...]],
                 loaded: Mapping[str, tuple[int, ...] | torch.Size]) -> WeightReport:
    """Compare name -> shape maps: what `expected` lacks, what `loaded` lacks, what differs."""
    report = WeightReport(missing=sorted(set(expected) - set(loaded)),
                          unexpected=sorted(set(loaded) - set(expected)))
    for name in sorted(set(expected) & set(loaded)):
        want, got = tuple(expected[name]), tuple(loaded[name])
        if want != got:
            report.misshaped.append((name, want, got))
    return report


class LoadTracker:
    """What a model's load_weights did with each checkpoint tensor.

    `params` are the model parameter names that must be loaded. A parameter fused from several
    checkpoint tensors (q/k/v -> qkv_proj) lists its shard ids in `shards`; it counts as loaded
    once every shard has been loaded. Parameters filled another way (a tied lm_head) are left out
    of `params`, or passed to `.skip()`.
    """

    def __init__(self, params: Iterable[str],
                 shards: Mapping[str, list | tuple | set] | None = None,
                 shard_name: Callable[[str, Any], str | None] | None = None) -> None:
        # shard_name(param, shard_id): the checkpoint tensor a missing shard comes from, so the
        # report names what the checkpoint lacks ("...up_proj.weight"), not the fused parameter
        self._shard_name = shard_name
        self._needed: dict[str, set] = {p: set() for p in params}
        for param, ids in (shards or {}).items():
            if param not in self._needed:
                raise KeyError(f"shards given for {param!r}, which is not in params")
            self._needed[param] = set(ids)
        self._done: dict[str, set] = {}
        self._unused: list[str] = []
        self._misshaped: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []

    def loaded(self, name: str, param_name: str, shard_id: Any = None) -> None:
        """Checkpoint tensor `name` was loaded into `param_name` (shard `shard_id` of it)."""
        self._done.setdefault(param_name, set()).add(shard_id)

    def unused(self, name: str) -> None:
        """Checkpoint tensor `name` matched no parameter."""
        self._unused.append(name)

    def misshaped(self, name: str, expected: tuple[int, ...] | torch.Size,
                  got: tuple[int, ...] | torch.Size, param_name: str | None = None,
                  shard_id: Any = None) -> None:
        """Checkpoint tensor `name` has shape `got` where `expected` was needed. With
        `param_name` the parameter (shard) is reported as misshaped only, not also as missing."""
        self._misshaped.append((name, tuple(expected), tuple(got)))
        if param_name is not None:
            self._done.setdefault(param_name, set()).add(shard_id)

    def skip(self, param_name: str) -> None:
        """`param_name` needs no checkpoint tensor (for example tied to the embedding)."""
        self._needed.pop(param_name, None)

    def weight_report(self) -> WeightReport:
        missing = []
        for param, shards in self._needed.items():
            done = self._done.get(param)
            if done is None:
                missing.append(param)
            else:
                for shard in sorted(shards - done, key=str):
                    name = self._shard_name(param, shard) if self._shard_name else None
                    missing.append(f"{name} (part {shard!r} of {param})" if name
                                   else f"{param} (shard {shard!r})")
        return WeightReport(missing=missing, unexpected=list(self._unused),
                            misshaped=list(self._misshaped))

    def report(self) -> dict:
        """{"missing": [...], "unexpected": [...], "misshaped": [{name, expected, got}]}."""
        return self.weight_report().as_dict()

    def raise_if_errors(self, model_name: str) -> None:
        self.weight_report().raise_if_errors(model_name)
