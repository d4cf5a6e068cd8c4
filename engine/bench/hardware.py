"""The hardware a benchmark ran on, measured in the same run: device name and memory, and on
CUDA the two ceilings the rooflines divide by - the device-to-device copy bandwidth (bytes read +
written by a 1 GiB copy) and the bf16 matmul rate (an 8192^3 matmul), each the median of a few
repetitions after a warm-up, about a second in all. On the CPU neither is measured: the
rooflines do not apply there and the record says so.
"""

from __future__ import annotations

import os
import platform
import statistics

import torch

CPU_NOTE = "CPU: copy bandwidth and matmul rate not measured; the rooflines do not apply"


def _cuda_ms(fn, reps: int) -> float:
    fn()  # warm-up: allocator, cuBLAS heuristics
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """GB/s of a device-to-device copy of `nbytes`, counting bytes read + written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = _cuda_ms(lambda: dst.copy_(src), reps)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    """TFLOP/s of an n x n x n bf16 matmul (2 n^3 FLOPs)."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    ms = _cuda_ms(lambda: a @ b, reps)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def _cpu_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def measure_hardware(device: str | torch.device) -> dict:
    """{"device", "name", "memory_bytes", "copy_bandwidth_gbs", "matmul_tflops", "count"} (and
    "note" on the CPU, where the two rates are null)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return {"device": "cpu", "name": _cpu_name(), "memory_bytes": _cpu_memory_bytes(),
                "cores": os.cpu_count(), "copy_bandwidth_gbs": None, "matmul_tflops": None,
                "note": CPU_NOTE}
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    with torch.cuda.device(index):
        bw = copy_bandwidth_gbs(torch.device("cuda", index))
        tflops = matmul_tflops(torch.device("cuda", index))
        torch.cuda.empty_cache()
    return {"device": "cuda", "name": props.name, "memory_bytes": props.total_memory,
            "count": torch.cuda.device_count(),
            "compute_capability": f"{props.major}.{props.minor}",
            "copy_bandwidth_gbs": bw, "matmul_tflops": tflops,
            "torch": torch.__version__, "cuda": torch.version.cuda}


def describe_hardware(hw: dict) -> str:
    """One line for the terminal."""
    mem = f"{hw['memory_bytes'] / 2**30:.0f} GiB" if hw.get("memory_bytes") else "memory ?"
    if hw.get("copy_bandwidth_gbs") is None:
        return f"hardware: {hw['name']} ({hw['device']}, {mem}); {hw.get('note', CPU_NOTE)}"
    return (f"hardware: {hw['name']} ({mem}), copy {hw['copy_bandwidth_gbs'] / 1e3:.2f} TB/s, "
            f"bf16 matmul {hw['matmul_tflops']:.0f} TFLOP/s (measured now)")


def host_hardware() -> dict:
    """This host's GPU as nvidia-smi names it (no CUDA context, nothing measured: a server may
    be running on it), else the CPU: the hardware of a client-side benchmark (bench serve),
    which is the server's when it runs on this host."""
    import shutil
    import subprocess

    note = "the client's host, not measured (the server's when it runs here)"
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,memory.total",
                                  "--format=csv,noheader,nounits"], capture_output=True,
                                 text=True, timeout=10, check=True).stdout.strip().splitlines()
        except (OSError, subprocess.SubprocessError):
            out = []
        if out:
            name, mib = (x.strip() for x in out[0].split(",", 1))
            return {"device": "cuda", "name": name,
                    "memory_bytes": int(float(mib)) << 20 if mib.replace(".", "").isdigit()
                    else None, "count": len(out), "copy_bandwidth_gbs": None,
                    "matmul_tflops": None, "note": note}
    return {"device": "cpu", "name": _cpu_name(), "memory_bytes": _cpu_memory_bytes(),
            "copy_bandwidth_gbs": None, "matmul_tflops": None, "note": note}
