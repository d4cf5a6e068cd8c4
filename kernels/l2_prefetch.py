"""Prefetch tensors into the GPU's L2 cache on a side stream, for a later kernel to read there.

At batch 1 a decoder layer's attention reads a few KB of cache per head: for its ~10 µs the
GPU's memory bandwidth is idle, and the out projection after it then streams its weight from
DRAM behind a fixed start. Issued on a side stream when the attention begins, this kernel loads
that weight into L2 in the idle time; the out projection then reads it from L2. Nothing is
written: the prefetch instructions are hints, so the values read later are the same either way.

`prefetch_l2(tensors, stream)` queues the prefetch on `stream` after the current stream's work
(kernels.ops.prefetch_l2 / join_prefetch: on the device's side stream, and the join). Both
record into a CUDA graph being captured: the prefetch becomes a branch of the graph. CUDA only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import cuda_index

LINE_BYTES = 128  # an L2 line (the prefetch instruction's unit)
LINES_PER_STEP = 1024  # one prefetch per thread per 128 lines with 4 warps
PREFETCH_PROGRAMS = 32  # a quarter of an H100 / H200's SMs: the attention keeps the rest
EVICT_LAST = False  # the lines' L2 eviction priority: normal (True: evict_last)


@triton.jit
def _prefetch_kernel(ptr, num_lines, LINES: tl.constexpr, LINE: tl.constexpr,
                     EVICT_LAST: tl.constexpr):
    step = tl.num_programs(0) * LINES
    for start in range(tl.program_id(0) * LINES, num_lines, step):
        # past the end: the last line again (a prefetch takes no mask)
        line = tl.minimum(start + tl.arange(0, LINES), num_lines - 1)
        addr = ptr + line.to(tl.int64) * LINE
        if EVICT_LAST:
            tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;",
                                      "=r,l", [addr], dtype=tl.int32, is_pure=False, pack=1)
        else:
            tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;",
                                      "=r,l", [addr], dtype=tl.int32, is_pure=False, pack=1)


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's storage as a flat uint8 tensor (no copy)."""
    assert t.is_contiguous(), "prefetch a contiguous tensor"
    return t.reshape(-1).view(torch.uint8)


def prefetch_l2(tensors: list[torch.Tensor], stream: torch.cuda.Stream,
                num_programs: int | None = None, evict_last: bool | None = None) -> None:
    """Queue L2 prefetches of `tensors` (contiguous, CUDA) on `stream`, after the work queued
    so far on the current stream (None: the module's PREFETCH_PROGRAMS / EVICT_LAST)."""
    num_programs = num_programs or PREFETCH_PROGRAMS
    evict_last = EVICT_LAST if evict_last is None else evict_last
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for t in tensors:
            flat = byte_view(t)
            lines = triton.cdiv(flat.numel(), LINE_BYTES)
            if lines:
                _prefetch_kernel[(min(num_programs, triton.cdiv(lines, LINES_PER_STEP)),)](
                    flat, lines, LINES=LINES_PER_STEP, LINE=LINE_BYTES, EVICT_LAST=evict_last,
                    num_warps=4)


_streams: dict[int, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The device's prefetch stream (one per device, kept for the process's life)."""
    index = cuda_index(device)
    if index not in _streams:
        _streams[index] = torch.cuda.Stream(index)
    return _streams[index]

