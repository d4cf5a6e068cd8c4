"""How a layer's parameters are split across tensor-parallel ranks (`ShardSpec`), read by the
sharding verification (engine.validate.sharding), and `divide`, the size check every parallel
layer makes."""

from __future__ import annotations

from dataclasses import dataclass


def divide(numerator: int, denominator: int, what: str = "size") -> int:
    from engine.errors import ConfigError

    if numerator % denominator:
        raise ConfigError(f"{what}={numerator} is not divisible by tensor_parallel_size="
                          f"{denominator}: choose a tensor_parallel_size that divides it")
    return numerator // denominator



@dataclass(frozen=True)
class ShardPart:
    """One part of a parameter along its split dimension (q, k, v; gate, up), in the order the
    full (checkpoint) tensor has them."""

    size: int  # full length: all pieces together
    per_rank: int  # length of the piece each rank holds
    replicas: int = 1  # consecutive ranks that hold the same piece (KV heads when kv < tp)
    name: str = ""

    @property
    def num_pieces(self) -> int:
        return self.size // self.per_rank


@dataclass(frozen=True)
class ShardSpec:
    """How a parameter is split across tensor-parallel ranks.

    `dim` None: replicated, every rank holds the whole tensor. Otherwise rank r's tensor is, along
    `dim`, the concatenation over `parts` of piece r // part.replicas of each part (piece j of a
    part is its entries j*per_rank ... (j+1)*per_rank - 1). `valid`: only the first `valid`
    entries of the full tensor along `dim` are real; the rest is padding and must be zero.
    """

    dim: int | None = None
    parts: tuple[ShardPart, ...] = ()
    valid: int | None = None

    def describe(self) -> str:
        if self.dim is None:
            return "replicated"
        text = f"dim {self.dim}"
        if len(self.parts) > 1 or self.parts[0].name:
            text += " [" + " | ".join(p.name or str(i) for i, p in enumerate(self.parts)) + "]"
        reps = [f"{p.name or i} x{p.replicas}" for i, p in enumerate(self.parts) if p.replicas > 1]
        if reps:
            text += ", replicated " + ", ".join(reps)
        if self.valid is not None and self.valid < sum(p.size for p in self.parts):
            text += f", padded {self.valid}->{sum(p.size for p in self.parts)}"
        return text


REPLICATED = ShardSpec()


def split_spec(dim: int, size: int, tp: int, name: str = "", valid: int | None = None
               ) -> ShardSpec:
    """A tensor cut into `tp` equal consecutive pieces along `dim`."""
    return ShardSpec(dim, (ShardPart(size, size // tp, 1, name),), valid)
