"""Which way of leaving an NCCL group blocks on this machine? Plain torch.distributed, no aphro
code: each variant runs 2 fresh rank processes (one GPU each) in parallel with the others and
times every rank's teardown; a rank still busy after --limit seconds dumps its stack.

    NCCL_NVLS_ENABLE=0 python3 scripts/nccl_teardown_diag.py [--limit 40]

Variants (what each rank does after one all_reduce):
  destroy        destroy_process_group() on both ranks
  destroy-gloo   as destroy, with a gloo subgroup made after init (as aphro's workers have)
  graph          an all_reduce captured in a CUDA graph and replayed, graph dropped, then destroy
  graph-alive    as graph, the graph still alive at destroy
  graph-alive-abort  as graph-alive, then abort
  lazy           destroy, the group made without device_id (communicator made at first use)
  thread-abort   abort from a thread other than the main one (as aphro's driver did)
  abort          _abort_process_group() on both ranks
  exit-destroy   rank 1 exits without leaving, rank 0 destroys
  exit-abort     rank 1 exits without leaving, rank 0 aborts
  reinit         destroy on both, then the same processes make and use a new group
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import os
import socket
import subprocess
import sys
import time

VARIANTS = ["destroy", "destroy-gloo", "graph", "graph-alive", "graph-alive-abort", "lazy",
            "thread-abort", "abort", "exit-destroy", "exit-abort", "reinit"]


def rank_main(variant: str, rank: int, port: int, limit: float) -> None:
    import torch
    import torch.distributed as dist

    faulthandler.dump_traceback_later(limit, exit=True)
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)

    def join(p: int) -> None:
        store = dist.TCPStore("127.0.0.1", p, 2, rank == 0, timeout=datetime.timedelta(seconds=30))
        dist.init_process_group("nccl", store=store, rank=rank, world_size=2,
                                device_id=None if variant == "lazy" else dev,
                                timeout=datetime.timedelta(seconds=60))
        x = torch.ones(4, device=dev)
        dist.all_reduce(x)
        torch.cuda.synchronize()
        assert x[0].item() == 2

    join(port)
    if variant == "destroy-gloo":
        dist.new_group(backend="gloo")
    if variant.startswith("graph"):
        y = torch.ones(1 << 20, device=dev)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            dist.all_reduce(y)  # warm-up outside capture
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            dist.all_reduce(y)
        g.replay()
        torch.cuda.synchronize()
        if variant == "graph":
            del g
    if variant.startswith("exit") and rank == 1:
        sys.stdout.flush()
        os._exit(0)
    if variant.startswith("exit"):
        time.sleep(1.0)  # rank 1 is gone
    t = time.perf_counter()
    if variant in ("abort", "exit-abort", "graph-alive-abort"):
        dist.distributed_c10d._abort_process_group()
    elif variant == "thread-abort":
        import threading
        th = threading.Thread(target=dist.distributed_c10d._abort_process_group)
        th.start()
        th.join()
    else:
        dist.destroy_process_group()
    print(f"{variant} rank {rank}: left in {time.perf_counter() - t:.2f} s", flush=True)
    if variant == "reinit":
        t = time.perf_counter()
        join(port + 1)
        dist.destroy_process_group()
        print(f"{variant} rank {rank}: second group made, used, left in "
              f"{time.perf_counter() - t:.2f} s", flush=True)
    faulthandler.cancel_dump_traceback_later()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=float, default=40.0)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rank", nargs=3)  # variant rank port: internal
    args = ap.parse_args()
    if args.rank:
        rank_main(args.rank[0], int(args.rank[1]), int(args.rank[2]), args.limit)
        return
    procs = {}
    for variant in args.variants.split(","):
        port = free_port()
        while True:  # reinit uses port + 1 too
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + 1))
                break
            except OSError:
                port = free_port()
        procs[variant] = [subprocess.Popen(
            [sys.executable, __file__, "--limit", str(args.limit), "--rank", variant, str(r),
             str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for r in range(2)]
    rows = []
    for variant, ps in procs.items():
        for r, p in enumerate(ps):
            out, _ = p.communicate(timeout=args.limit + 60)
            lines = [x for x in out.splitlines() if x.strip()]
            left = [x for x in lines if x.startswith(variant)]
            hung = "Timeout" in out or p.returncode not in (0, None)
            rows.append(f"{variant:13s} rank {r}: rc {p.returncode}  "
                        + ("; ".join(x.split(': ', 1)[1] for x in left) or "-")
                        + ("  HUNG/FAILED" if hung and not left else ""))
            if hung:
                print(f"--- {variant} rank {r} output (last 40 lines)")
                print("\n".join(lines[-40:]))
    print("\n== NCCL teardown")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
