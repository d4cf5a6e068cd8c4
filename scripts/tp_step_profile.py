"""Where a tensor-parallel decode step's time goes (a diagnostic; prints numbers, asserts nothing).

  python3 -m scripts.tp_step_profile allreduce [--world 2]
      per-op latency of an all-reduce of [tokens, 4096] bf16 on the GPUs: NCCL eagerly and
      inside a CUDA graph (64 in a row, as a decode step of a 32-layer model has), and torch's
      symmetric-memory one-shot / two-shot all-reduce where this torch has them.
  python3 -m scripts.tp_step_profile step [--tp 1 --tp 2] [--preset llama-8b]
      batch-1 decode through LLMEngine.step, host time per phase on the driver (prepare_host, to_wire,
      broadcast, model launch, wait for the GPU, the rest: scheduler, sampler, detokenizer) and
      on rank 1 (waiting for the message, to_device + launch). No CUDA synchronisation is added
      inside a step: a phase that waits for the GPU shows that wait.
Run with PYTHONPATH at the repository root (python3 -m scripts.tp_step_profile ...).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from scripts.nccl_teardown_diag import free_port

_TIMES: dict[str, list[float]] = collections.defaultdict(list)


def _timed(name: str, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _TIMES[name].append(time.perf_counter() - t0)
    return wrapper


# -- all-reduce ----------------------------------------------------------------------------------
def _per_op_us(fn, ops: int, graph: bool, iters: int = 30) -> float:
    """Microseconds per call of fn, `ops` calls in a row (eagerly, or replaying one graph)."""
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(ops):
                fn()
        run = g.replay
    else:
        def run():
            for _ in range(ops):
                fn()
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        run()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (iters * ops) * 1e6


def _allreduce_row(tokens: int, rank: int, name: str, symm) -> dict:
    """One message size: per-op microseconds of each all-reduce, and its max |error|."""
    torch.manual_seed(rank)
    x = torch.randn(tokens, 4096, dtype=torch.bfloat16, device="cuda")
    ref = x.clone()
    dist.all_reduce(ref)
    row = {"tokens": tokens, "kib": x.numel() * 2 / 1024}
    y = x.clone()
    row["nccl_eager_us"] = _per_op_us(lambda: dist.all_reduce(y), 64, graph=False)
    row["nccl_graph_us"] = _per_op_us(lambda: dist.all_reduce(y), 64, graph=True)
    if symm is not None:
        buf = symm
        view = buf[: x.numel()].view_as(x)
        ops = torch.ops.symm_mem
        try:
            got = ops.one_shot_all_reduce_copy(view, x, "sum", name)
            row["one_shot_maxdiff"] = (got.float() - ref.float()).abs().max().item()
            row["one_shot_eager_us"] = _per_op_us(
                lambda: ops.one_shot_all_reduce_copy(view, x, "sum", name), 64, False)
            row["one_shot_graph_us"] = _per_op_us(
                lambda: ops.one_shot_all_reduce_copy(view, x, "sum", name), 64, True)
        except Exception as e:  # noqa: BLE001
            row["one_shot"] = f"{type(e).__name__}: {str(e)[:200]}"
        try:
            def two_shot():
                view.copy_(x)
                return ops.two_shot_all_reduce_(view, "sum", name)
            got = two_shot().clone()
            row["two_shot_maxdiff"] = (got.float() - ref.float()).abs().max().item()
            row["two_shot_graph_us"] = _per_op_us(two_shot, 64, True)
        except Exception as e:  # noqa: BLE001
            row["two_shot"] = f"{type(e).__name__}: {str(e)[:200]}"
    return row


def _allreduce_rank(rank: int, world: int, port: int, out_path: str) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, device_id=torch.device("cuda", rank))
    rows = [{"rank": rank, "peer_access": [torch.cuda.can_device_access_peer(rank, r)
                                           for r in range(world) if r != rank]}]
    name = dist.group.WORLD.group_name
    symm = None
    try:
        import torch.distributed._symmetric_memory as symm_mem
        if hasattr(symm_mem, "enable_symm_mem_for_group"):
            symm_mem.enable_symm_mem_for_group(name)
        buf = symm_mem.empty(512 * 4096, dtype=torch.bfloat16, device=f"cuda:{rank}")
        symm_mem.rendezvous(buf, name)
        symm = buf
    except Exception as e:  # noqa: BLE001 - report and go on with NCCL alone
        rows.append({"note": f"symmetric memory unavailable: {type(e).__name__}: {e}"})
    rows += [_allreduce_row(tokens, rank, name, symm) for tokens in (1, 8, 64, 512)]
    if rank == 0:
        Path(out_path).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def allreduce(world: int) -> list[dict]:
    import torch.multiprocessing as mp

    out = os.path.join(tempfile.mkdtemp(), "allreduce.json")
    mp.spawn(_allreduce_rank, args=(world, free_port(), out), nprocs=world, join=True)
    return json.loads(Path(out).read_text())


# -- one decode step, phase by phase -------------------------------------------------------------
def worker_timers():
    """rank_init for the workers: time rank 1's wait for each message and its step; the
    returned undo (run at release) writes the figures next to APHRO_PROFILE_OUT."""
    from engine import worker as w
    from engine.distributed import get_tp_rank

    old_recv, old_step = w.recv, w.RankState.step
    w.recv = _timed("rank1 wait for message", old_recv)
    w.RankState.step = _timed("rank1 to_device + model", old_step)
    rank = get_tp_rank()

    def undo():
        w.recv, w.RankState.step = old_recv, old_step
        if rank == 1:
            Path(os.environ["APHRO_PROFILE_OUT"] + ".rank1").write_text(json.dumps(_TIMES))
    return undo


def step_profile(tp: int, preset: str, steps: int) -> dict:
    from engine import benchmark, executor, llm_engine
    from engine.rank_group import RankGroup
    from engine.worker import Worker

    _TIMES.clear()
    os.environ["APHRO_PROFILE_OUT"] = out = os.path.join(tempfile.mkdtemp(), "times")
    import scripts.tp_step_profile as this  # by module name: the workers unpickle rank_init
    patches = [(Worker, "prepare"), (Worker, "prepare_host"), (Worker, "execute"), (RankGroup, "broadcast"),
               (RankGroup, "wait_device"), (llm_engine.LLMEngine, "step")]
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr in patches]
    saved += [(executor, "to_wire", executor.to_wire), (executor, "to_device", executor.to_device)]
    saved.append((llm_engine, "Executor", llm_engine.Executor))
    for obj, attr in patches:
        setattr(obj, attr, _timed(f"{obj.__name__}.{attr}", getattr(obj, attr)))
    executor.to_wire = _timed("to_wire", executor.to_wire)
    executor.to_device = _timed("driver to_device", executor.to_device)
    events: list[tuple] = []
    if torch.cuda.is_available():  # the decode graph's own GPU time (driver), by CUDA events
        from engine.model_runner import CUDAGraphs
        saved.append((CUDAGraphs, "run", CUDAGraphs.run))
        graph_run = CUDAGraphs.run

        def run_with_events(self, inp):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = graph_run(self, inp)
            end.record()
            events.append((start, end))
            return out
        CUDAGraphs.run = run_with_events
    if tp > 1:
        real = llm_engine.Executor
        llm_engine.Executor = lambda cfg: real(cfg, rank_init=this.worker_timers)
    try:
        with tempfile.TemporaryDirectory() as d:
            model = benchmark.preset_config_dir(preset, d)
            r = benchmark.decode_latency(model, tp=tp, input_len=128, output_len=steps)
    finally:
        for obj, attr, old in saved:
            setattr(obj, attr, old)
    decode = {k: statistics.median(v[-(steps - 1):]) * 1e3 for k, v in _TIMES.items()}
    if events:
        torch.cuda.synchronize()
        decode["decode graph, GPU time (events)"] = statistics.median(
            s.elapsed_time(e) for s, e in events[-(steps - 1):])
    rank1 = Path(out + ".rank1")
    for _ in range(100):
        if rank1.exists():
            break
        time.sleep(0.1)
    if rank1.exists():
        decode |= {k: statistics.median(v[-(steps - 1):]) * 1e3
                   for k, v in json.loads(rank1.read_text()).items()}
    return {"tp": tp, "decode_ms_median": r["decode_ms_median"], "phases_ms": decode}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["allreduce", "step"])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--tp", type=int, action="append")
    ap.add_argument("--preset", default="llama-8b")
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args()
    if args.what == "allreduce":
        for row in allreduce(args.world):
            print(json.dumps(row))
        return
    for tp in args.tp or [1, 2]:
        r = step_profile(tp, args.preset, args.steps)
        print(f"tp={tp} decode {r['decode_ms_median']:.3f} ms/step (median); phases, median ms:")
        for k, v in r["phases_ms"].items():
            print(f"  {k:32s} {v:8.3f}")


if __name__ == "__main__":
    main()
