"""Helpers shared by the Triton kernels: launch-time facts and small jit functions."""

from __future__ import annotations

import functools
import inspect
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def upcast_dots(dtype: torch.dtype) -> bool:
    """The interpreter multiplies bf16 tiles wrongly (triton 3.9): feed it float32 instead."""
    return interpreting() and dtype == torch.bfloat16


def runtime_args(*names: str) -> dict:
    """triton.jit keywords that keep the named arguments out of a kernel's specialization.

    Triton compiles a variant of a kernel for every integer argument that is 1 or a multiple
    of 16 and every pointer that is 16-byte aligned. Arguments that change with the batch's
    make-up (a block table sliced past the prefills, its row stride, a split count, a token
    count) then compiled new variants under live traffic: 0.5-1.7 s each on an H200 (run 7d,
    docs/PERF.md). Only the keywords this Triton version has are given."""
    params = inspect.signature(triton.jit).parameters
    return {k: list(names) for k in ("do_not_specialize", "do_not_specialize_on_alignment")
            if k in params}


def cuda_index(device: torch.device) -> int:
    """A CUDA device's index ("cuda" alone: the current device)."""
    return device.index if device.index is not None else torch.cuda.current_device()


_persistent: dict[tuple[str, torch.device], torch.Tensor] = {}
_retired: list[torch.Tensor] = []  # outgrown buffers: a graph captured earlier may still use them


def persistent_buffer(name: str, device: torch.device, numel: int, dtype: torch.dtype,
                      zeroed: bool = False) -> torch.Tensor:
    """The device's buffer `name` of at least `numel` elements, kept across calls and CUDA
    graph replays (split partials, the arrival counters of a last-program reduction, which the
    kernels leave at zero). Grown only outside graph capture (the engine's warm-up runs every
    shape first), and an outgrown buffer is kept alive, never handed back to the allocator: a
    graph captured before keeps using it. A megabyte or two in all, not counted in the KV-cache
    budget, kept for the process's life."""
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0": one buffer
        device = torch.device("cuda", cuda_index(device))
    buf = _persistent.get((name, device))
    if buf is None or buf.numel() < numel:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"the kernels' {name} buffer must be made before CUDA graph "
                               "capture: run the shape once first (the engine's warm-up does)")
        if buf is not None:
            _retired.append(buf)
        size = max(numel, buf.numel() if buf is not None else 0)
        buf = (torch.zeros if zeroed else torch.empty)(size, dtype=dtype, device=device)
        _persistent[(name, device)] = buf
    return buf


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device; a stand-in of 132 (one H200) elsewhere."""
    if device.type != "cuda":
        return 132
    return sm_count(cuda_index(device))


@triton.jit
def tanh(x):
    # 1 - 2 / (e^{2x} + 1): saturates cleanly to +-1 in float32
    return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def dot(a, b, UPCAST: tl.constexpr):
    """a @ b with a float32 accumulator. float32 tiles multiply in float32 (IEEE), not in
    Triton's default TF32: a float32 engine is the precise one parity checks lean on, and TF32's
    ~1e-3 noise is enough to flip FP8 activation roundings downstream."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def round_to_e4m3(v):
    """v (float32, |v| <= 448) rounded to the nearest e4m3 value, ties to even, still float32.
    The conversion to fp8 is then exact; Triton's interpreter rounds some values wrongly when
    it converts (triton 3.9: a carry into the exponent is lost), the GPU never does."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # keep 3 mantissa bits
    rounded = (tl.abs(v) + 24576.0) - 24576.0  # a multiple of 2^-9, the subnormal spacing
    sign = v.to(tl.int32, bitcast=True) & -2147483648  # -0.0 stays -0.0, as in torch
    subnormal = (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(v) < 0.015625, subnormal, bits.to(tl.float32, bitcast=True))


@triton.jit
def count_in(counter_ptr):
    """One program's arrival on a counter shared by the programs that split a reduction,
    after its partial is stored: a CTA barrier, then an acquire-release add (the order CUDA's
    own grid synchronization relies on). Returns how many arrived before it; the one that sees
    `total - 1` is last, reads the others' partials past L1 (".cg") and calls reset_if_last.
    Nothing waits, so the programs need not be resident together. (The interpreter runs
    programs one after another: CPU tests check the arithmetic and the reset, not ordering.)"""
    tl.debug_barrier()
    return tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")


@triton.jit
def reset_if_last(counter_ptr, arrived, total):
    """The last program to arrive (count_in) sets the counter back to zero for the next call."""
    tl.atomic_xchg(counter_ptr, 0, mask=arrived == total - 1, sem="relaxed", scope="gpu")


@triton.jit
def to_cache(x, FP8: tl.constexpr, FP8_MAX: tl.constexpr, ROUND: tl.constexpr):
    """x as the KV cache stores it, before the conversion to its element type: for an FP8
    (e4m3) cache saturated at +-FP8_MAX (no per-tensor scale: it is 1), and rounded here under
    the interpreter, whose own conversion rounds some values wrongly; else unchanged."""
    if FP8:
        x = tl.clamp(x.to(tl.float32), -FP8_MAX, FP8_MAX)
        if ROUND:
            x = round_to_e4m3(x)
    return x


def shared_memory_bytes(device: torch.device) -> int:
    """Shared memory one program may use on `device` (an H100 / H200 SM's 227 KB off CUDA)."""
    if device.type != "cuda":
        return 232448
    return _shared_memory(cuda_index(device))


@functools.cache
def _shared_memory(index: int) -> int:
    from triton.runtime import driver

    return int(driver.active.utils.get_device_properties(index)["max_shared_mem"])
