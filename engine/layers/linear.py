"""Linear layers that own their tensor-parallel shard and know how to load it.

Column-parallel layers split the output dimension across ranks, row-parallel ones the input
dimension (followed by an all-reduce). Every weight has a `weight_loader(param, loaded, shard_id)`
that cuts this rank's piece out of the full checkpoint tensor; models never slice weights.
`LinearMethod` is the quantization hook: it creates the parameters and applies the matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_gather, tp_all_reduce
from engine.errors import ShapeMismatchError
from engine.layers.sharding import REPLICATED, ShardPart, ShardSpec, divide, split_spec


class LinearMethod:
    """Creates a layer's weights and applies them. Quantized methods subclass this."""

    def create_weights(self, layer: nn.Module, input_size_per_partition: int,
                       output_size_per_partition: int, params_dtype: torch.dtype) -> None:
        raise NotImplementedError

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


class UnquantizedLinearMethod(LinearMethod):
    def create_weights(self, layer, input_size_per_partition, output_size_per_partition,
                       params_dtype):
        weight = torch.empty(output_size_per_partition, input_size_per_partition,
                             dtype=params_dtype)
        layer.register_parameter("weight", nn.Parameter(weight, requires_grad=False))

    def apply(self, layer, x, bias=None):
        return F.linear(x, layer.weight, bias)


def copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy src into dst, refusing any shape difference (never broadcast)."""
    if tuple(dst.shape) != tuple(src.shape):
        raise ShapeMismatchError(tuple(dst.shape), tuple(src.shape))
    dst.copy_(src)


def load_shard(dst: torch.Tensor, loaded: torch.Tensor, dim: int, index: int,
               full_size: int) -> None:
    """Copy piece `index` (of size dst.shape[dim]) of `loaded` along `dim` into dst; `loaded`
    must be exactly `full_size` long on `dim` and match dst elsewhere."""
    expected = list(dst.shape)
    expected[dim] = full_size
    if list(loaded.shape) != expected:
        raise ShapeMismatchError(tuple(expected), tuple(loaded.shape))
    size = dst.shape[dim]
    copy_checked(dst, loaded.narrow(dim, index * size, size))


class LinearBase(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool,
                 params_dtype: torch.dtype | None, linear_method: LinearMethod | None,
                 in_per_rank: int, out_per_rank: int) -> None:
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.linear_method = linear_method or UnquantizedLinearMethod()
        dtype = params_dtype or torch.get_default_dtype()
        self.linear_method.create_weights(self, in_per_rank, out_per_rank, dtype)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_per_rank, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: int | str | None = None) -> None:
        raise NotImplementedError

    def tp_shard_spec(self, param_name: str) -> ShardSpec | None:
        """How parameter `param_name` of this layer is split across ranks (read by
        engine.validate.sharding); None for a parameter the layer does not describe."""
        return None


class ReplicatedLinear(LinearBase):
    """The full weight on every rank."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 params_dtype: torch.dtype | None = None,
                 linear_method: LinearMethod | None = None) -> None:
        super().__init__(input_size, output_size, bias, params_dtype, linear_method,
                         input_size, output_size)

    def weight_loader(self, param, loaded, shard_id=None):
        copy_checked(param.data, loaded)

    def tp_shard_spec(self, param_name):
        return REPLICATED if param_name in ("weight", "bias") else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_method.apply(self, x, self.bias)


class ColumnParallelLinear(LinearBase):
    """Y = XA + b with A split by columns (the output dimension): rank r holds rows
    r*out/tp ... (r+1)*out/tp of the [out, in] weight."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 gather_output: bool = False, params_dtype: torch.dtype | None = None,
                 linear_method: LinearMethod | None = None) -> None:
        self.gather_output = gather_output
        out_per_rank = divide(output_size, get_tp_size(), "output_size")
        super().__init__(input_size, output_size, bias, params_dtype, linear_method,
                         input_size, out_per_rank)

    def weight_loader(self, param, loaded, shard_id=None):
        load_shard(param.data, loaded, 0, self.tp_rank, self.output_size)

    def tp_shard_spec(self, param_name):
        if param_name not in ("weight", "bias"):
            return None
        return split_spec(0, self.output_size, self.tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear_method.apply(self, x, self.bias)
        return tp_all_gather(y) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs (e.g. gate and up) in one matmul. Each rank holds its
    slice of every part, concatenated. shard_id is the part's index; None loads a checkpoint
    tensor that is already fused (all parts concatenated in order)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = True,
                 params_dtype: torch.dtype | None = None,
                 linear_method: LinearMethod | None = None) -> None:
        self.output_sizes = list(output_sizes)
        for size in self.output_sizes:
            divide(size, get_tp_size(), "output_size")
        super().__init__(input_size, sum(output_sizes), bias, False, params_dtype,
                         linear_method)

    def weight_loader(self, param, loaded, shard_id=None):
        if shard_id is None:
            if loaded.shape[0] != self.output_size:
                raise ShapeMismatchError((self.output_size, *loaded.shape[1:]), loaded.shape,
                                         " + ".join(map(str, self.output_sizes)) + " rows")
            for i, part in enumerate(loaded.split(self.output_sizes, dim=0)):
                self.weight_loader(param, part, i)
            return
        tp = self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // tp
        size = self.output_sizes[shard_id] // tp
        load_shard(param.data.narrow(0, offset, size), loaded, 0, self.tp_rank,
                   self.output_sizes[shard_id])

    def tp_shard_spec(self, param_name):
        if param_name not in ("weight", "bias"):
            return None
        return ShardSpec(0, tuple(ShardPart(size, size // self.tp_size, 1, str(i))
                                  for i, size in enumerate(self.output_sizes)))


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q, k, v projections, split by heads. With fewer KV heads than ranks each KV head is
    replicated on tp/num_kv_heads ranks. shard_id is "q", "k" or "v"; None loads a checkpoint
    tensor holding [q; k; v] concatenated."""

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int,
                 total_num_kv_heads: int | None = None, bias: bool = True,
                 params_dtype: torch.dtype | None = None,
                 linear_method: LinearMethod | None = None) -> None:
        tp = get_tp_size()
        total_num_kv_heads = total_num_kv_heads or total_num_heads
        self.head_size = head_size
        self.total_num_heads, self.total_num_kv_heads = total_num_heads, total_num_kv_heads
        self.num_heads = divide(total_num_heads, tp, "num_attention_heads")
        if tp >= total_num_kv_heads:
            self.num_kv_heads = 1
            self.num_kv_head_replicas = divide(tp, total_num_kv_heads, "num_key_value_heads")
        else:
            self.num_kv_heads = divide(total_num_kv_heads, tp, "num_key_value_heads")
            self.num_kv_head_replicas = 1
        out_total = (self.num_heads + 2 * self.num_kv_heads) * tp * head_size
        self.q_size = self.num_heads * head_size  # per rank
        self.kv_size = self.num_kv_heads * head_size
        super().__init__(hidden_size, out_total, bias, False, params_dtype, linear_method)

    def weight_loader(self, param, loaded, shard_id=None):
        full_q = self.total_num_heads * self.head_size
        full_kv = self.total_num_kv_heads * self.head_size
        if shard_id is None:
            if loaded.shape[0] != full_q + 2 * full_kv:
                raise ShapeMismatchError((full_q + 2 * full_kv, *loaded.shape[1:]), loaded.shape,
                                         f"q {full_q} + k {full_kv} + v {full_kv} rows")
            for sid, part in zip("qkv", loaded.split([full_q, full_kv, full_kv], dim=0)):
                self.weight_loader(param, part, sid)
            return
        if shard_id == "q":
            offset, size, index, full = 0, self.q_size, self.tp_rank, full_q
        else:
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
            size, full = self.kv_size, full_kv
            index = self.tp_rank // self.num_kv_head_replicas
        load_shard(param.data.narrow(0, offset, size), loaded, 0, index, full)

    def tp_shard_spec(self, param_name):
        if param_name not in ("weight", "bias"):
            return None
        full_kv, reps = self.total_num_kv_heads * self.head_size, self.num_kv_head_replicas
        return ShardSpec(0, (
            ShardPart(self.total_num_heads * self.head_size, self.q_size, 1, "q"),
            ShardPart(full_kv, self.kv_size, reps, "k"), ShardPart(full_kv, self.kv_size, reps, "v")))


class RowParallelLinear(LinearBase):
    """Y = XA + b with A split by rows (the input dimension): each rank multiplies its slice of
    the input, the partial results are summed across ranks, then the (replicated) bias added."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 reduce_results: bool = True, params_dtype: torch.dtype | None = None,
                 linear_method: LinearMethod | None = None) -> None:
        self.reduce_results = reduce_results
        in_per_rank = divide(input_size, get_tp_size(), "input_size")
        super().__init__(input_size, output_size, bias, params_dtype, linear_method,
                         in_per_rank, output_size)

    def weight_loader(self, param, loaded, shard_id=None):
        if param.dim() == 1:  # bias: replicated
            copy_checked(param.data, loaded)
        else:
            load_shard(param.data, loaded, 1, self.tp_rank, self.input_size)

    def tp_shard_spec(self, param_name):
        if param_name == "bias":
            return REPLICATED
        return split_spec(1, self.input_size, self.tp_size) if param_name == "weight" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self.linear_method.apply(self, x, self.bias)
        y = self.linear_method.apply(self, x)
        if self.reduce_results:
            y = tp_all_reduce(y)
        return y + self.bias if self.bias is not None else y
