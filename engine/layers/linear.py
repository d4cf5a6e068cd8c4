"""Linear layers that own their tensor-parallel shard and know how to load it.

Column-parallel layers split the output dimension across ranks, row-parallel ones the input
dimension (followed by an all-reduce). Every parameter has a `weight_loader(param, loaded,
shard_id)` that cuts this rank's piece out of the full checkpoint tensor; models never slice
weights.

Each layer's `LinearMethod` (engine/layers/linear_method.py, the quantization hook) creates
its parameters and applies the matmul; the layer reads from each parameter's marks
(`linear_param`) how to shard and load it: the dimension that follows its output or input, or
one value per fused part (a per-tensor scale of q, k, v or gate, up).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_gather, tp_all_reduce
from engine.errors import ShapeMismatchError
from engine.layers.linear_method import LinearMethod, UnquantizedLinearMethod, linear_param
from engine.layers.sharding import REPLICATED, ShardPart, ShardSpec, divide, split_spec

__all__ = [
    "ColumnParallelLinear",
    "LinearBase",
    "LinearMethod",
    "MergedColumnParallelLinear",
    "QKVParallelLinear",
    "ReplicatedLinear",
    "RowParallelLinear",
    "UnquantizedLinearMethod",
    "copy_checked",
    "linear_param",
    "load_part_value",
    "load_shard",
]


def copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy src into dst, refusing any shape difference (never broadcast)."""
    if tuple(dst.shape) != tuple(src.shape):
        raise ShapeMismatchError(tuple(dst.shape), tuple(src.shape))
    dst.copy_(src)


def _with(shape, dim: int, size: int) -> tuple[int, ...]:
    """`shape` with entry `dim` set to `size` (the full tensor a fused loader expects)."""
    out = list(shape)
    out[dim] = size
    return tuple(out)


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


def load_part_value(param: torch.Tensor, part: int, loaded: torch.Tensor) -> None:
    """Entry `part` of a per-part parameter from a one-value checkpoint tensor (shape [] or
    [1]): a per-tensor scale of one fused part."""
    if loaded.numel() != 1:
        raise ShapeMismatchError((1,), tuple(loaded.shape), "one value per tensor")
    param.data[part].copy_(loaded.reshape(()))


class LinearBase(nn.Module):
    """A linear layer's shapes, its method and its parameters. `splits_input`: this rank holds
    a slice of the input dimension (row-parallel), so a per-output-channel statistic of the
    weight (a quantization scale) needs every rank's slice."""

    splits_input = False

    def __init__(self, input_size: int, output_size: int, bias: bool,
                 params_dtype: torch.dtype | None, linear_method: LinearMethod | None,
                 in_per_rank: int, out_per_rank: int,
                 output_partition_sizes: list[int] | None = None) -> None:
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.in_per_rank, self.out_per_rank = in_per_rank, out_per_rank
        # rows of each fused part on this rank, in order (one part when nothing is fused)
        self.output_partition_sizes = list(output_partition_sizes or [out_per_rank])
        self.params_dtype = params_dtype or torch.get_default_dtype()
        if bias:
            self.bias = linear_param(torch.empty(out_per_rank, dtype=self.params_dtype),
                                     output_dim=0)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self.set_linear_method(linear_method or UnquantizedLinearMethod())

    def set_linear_method(self, method: LinearMethod) -> None:
        """(Re)create the layer's weights with `method` (before loading): the model is built
        with one method and a checkpoint's quantization config may exempt some layers."""
        for name in [n for n in self._parameters if n != "bias"]:
            del self._parameters[name]
        self.linear_method = method
        method.create_weights(self, self.in_per_rank, self.out_per_rank, self.params_dtype)
        for name, param in self._parameters.items():
            if name != "bias" and param is not None:
                param.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: int | str | None = None) -> None:
        raise NotImplementedError

    def tp_shard_spec(self, param_name: str) -> ShardSpec | None:
        """How parameter `param_name` of this layer is split across ranks (read by
        engine.validate.sharding); None for a name that is not one of its parameters."""
        param = self._parameters.get(param_name)
        return None if param is None else self.param_spec(param)

    def param_spec(self, param: nn.Parameter) -> ShardSpec:
        return REPLICATED


class ReplicatedLinear(LinearBase):
    """The full weight on every rank."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 params_dtype: torch.dtype | None = None,
                 linear_method: LinearMethod | None = None) -> None:
        super().__init__(input_size, output_size, bias, params_dtype, linear_method,
                         input_size, output_size)

    def weight_loader(self, param, loaded, shard_id=None):
        if getattr(param, "per_part", False):
            load_part_value(param, 0, loaded)
        else:
            copy_checked(param.data, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_method.apply(self, x, self.bias)


class ColumnParallelLinear(LinearBase):
    """Y = XA + b with A split by columns (the output dimension): rank r holds rows
    r*out/tp ... (r+1)*out/tp of the [out, in] weight."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 gather_output: bool = False, params_dtype: torch.dtype | None = None,
                 linear_method: LinearMethod | None = None,
                 output_partition_sizes: list[int] | None = None) -> None:
        self.gather_output = gather_output
        out_per_rank = divide(output_size, get_tp_size(), "output_size")
        super().__init__(input_size, output_size, bias, params_dtype, linear_method,
                         input_size, out_per_rank, output_partition_sizes)

    def weight_loader(self, param, loaded, shard_id=None):
        if getattr(param, "per_part", False):
            load_part_value(param, 0, loaded)
        elif getattr(param, "output_dim", None) is None:
            copy_checked(param.data, loaded)
        else:
            load_shard(param.data, loaded, param.output_dim, self.tp_rank, self.output_size)

    def param_spec(self, param):
        if getattr(param, "per_part", False) or getattr(param, "output_dim", None) is None:
            return REPLICATED
        return self.output_spec(param.output_dim)

    def output_spec(self, dim: int) -> ShardSpec:
        """How a tensor whose dimension `dim` runs along the output is split across ranks."""
        return split_spec(dim, self.output_size, self.tp_size)

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
                         linear_method, [s // get_tp_size() for s in self.output_sizes])

    def weight_loader(self, param, loaded, shard_id=None):
        per_part, dim = getattr(param, "per_part", False), getattr(param, "output_dim", None)
        if shard_id is None and (per_part or dim is None):  # one value for every part
            for i in range(len(self.output_sizes)):
                self.weight_loader(param, loaded, i)
            return
        if shard_id is None:
            if loaded.dim() <= dim or loaded.shape[dim] != self.output_size:
                raise ShapeMismatchError(_with(param.shape, dim, self.output_size),
                                         loaded.shape,
                                         " + ".join(map(str, self.output_sizes)) + " rows")
            for i, part in enumerate(loaded.split(self.output_sizes, dim=dim)):
                self.weight_loader(param, part, i)
            return
        if per_part:
            load_part_value(param, shard_id, loaded)
            return
        if dim is None:
            copy_checked(param.data, loaded)
            return
        tp = self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // tp
        size = self.output_sizes[shard_id] // tp
        load_shard(param.data.narrow(dim, offset, size), loaded, dim, self.tp_rank,
                   self.output_sizes[shard_id])

    def output_spec(self, dim):
        return ShardSpec(dim, tuple(ShardPart(size, size // self.tp_size, 1, str(i))
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
        super().__init__(hidden_size, out_total, bias, False, params_dtype, linear_method,
                         [self.q_size, self.kv_size, self.kv_size])

    def weight_loader(self, param, loaded, shard_id=None):
        full_q = self.total_num_heads * self.head_size
        full_kv = self.total_num_kv_heads * self.head_size
        per_part, dim = getattr(param, "per_part", False), getattr(param, "output_dim", None)
        if shard_id is None and (per_part or dim is None):  # one value for q, k and v
            for sid in "qkv":
                self.weight_loader(param, loaded, sid)
            return
        if shard_id is None:
            if loaded.dim() <= dim or loaded.shape[dim] != full_q + 2 * full_kv:
                raise ShapeMismatchError(_with(param.shape, dim, full_q + 2 * full_kv),
                                         loaded.shape,
                                         f"q {full_q} + k {full_kv} + v {full_kv} rows")
            for sid, part in zip("qkv", loaded.split([full_q, full_kv, full_kv], dim=dim)):
                self.weight_loader(param, part, sid)
            return
        if per_part:
            load_part_value(param, "qkv".index(shard_id), loaded)
            return
        if dim is None:
            copy_checked(param.data, loaded)
            return
        if shard_id == "q":
            offset, size, index, full = 0, self.q_size, self.tp_rank, full_q
        else:
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
            size, full = self.kv_size, full_kv
            index = self.tp_rank // self.num_kv_head_replicas
        load_shard(param.data.narrow(dim, offset, size), loaded, dim, index, full)

    def output_spec(self, dim):
        full_kv, reps = self.total_num_kv_heads * self.head_size, self.num_kv_head_replicas
        return ShardSpec(dim, (
            ShardPart(self.total_num_heads * self.head_size, self.q_size, 1, "q"),
            ShardPart(full_kv, self.kv_size, reps, "k"), ShardPart(full_kv, self.kv_size, reps, "v")))


class RowParallelLinear(LinearBase):
    """Y = XA + b with A split by rows (the input dimension): each rank multiplies its slice of
    the input, the partial results are summed across ranks, then the (replicated) bias added."""

    splits_input = True

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 reduce_results: bool = True, params_dtype: torch.dtype | None = None,
                 linear_method: LinearMethod | None = None) -> None:
        self.reduce_results = reduce_results
        in_per_rank = divide(input_size, get_tp_size(), "input_size")
        super().__init__(input_size, output_size, bias, params_dtype, linear_method,
                         in_per_rank, output_size)

    def weight_loader(self, param, loaded, shard_id=None):
        if getattr(param, "per_part", False):
            load_part_value(param, 0, loaded)
        elif getattr(param, "input_dim", None) is None:  # bias, per-output scales: replicated
            copy_checked(param.data, loaded)
        else:
            load_shard(param.data, loaded, param.input_dim, self.tp_rank, self.input_size)

    def param_spec(self, param):
        dim = None if getattr(param, "per_part", False) else getattr(param, "input_dim", None)
        return REPLICATED if dim is None else split_spec(dim, self.input_size, self.tp_size)

    def forward(self, x: torch.Tensor, act: nn.Module | None = None) -> torch.Tensor:
        """x @ W^T + b, summed across ranks. `act`, a gated activation, is applied to x first
        (x is then [T, 2 * in]): explicit model files written by aphro's template of 2026-12-01
        call `down_proj(gate_up, act=self.act_fn)`, and still run."""
        if act is not None:
            x = act(x)
        if self.tp_size == 1:
            return self.linear_method.apply(self, x, self.bias)
        y = self.linear_method.apply(self, x)
        if self.reduce_results:
            y = tp_all_reduce(y)
        return y + self.bias if self.bias is not None else y
