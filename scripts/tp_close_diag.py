"""Diagnose tensor-parallel group reuse and teardown on a GPU machine (docs/VALIDATION.md):
two TP=2 engines one after the other (the second takes over the first's parked ranks), then an
explicit teardown of the parked group, each timed. Run with a hard limit and stack dumps:

    PYTHONPATH=$PWD PYTHONFAULTHANDLER=1 timeout -s ABRT 150 python3 scripts/tp_close_diag.py
"""

from __future__ import annotations

import tempfile
import time

import torch.distributed as dist

from engine import LLM, SamplingParams, rank_group
from engine.tiny import make_tiny_checkpoint, tiny_llama_config


def main() -> None:
    ckpt = make_tiny_checkpoint(tiny_llama_config(), tempfile.mkdtemp())
    params = SamplingParams(max_tokens=4, temperature=0)
    for i in range(2):
        t = time.perf_counter()
        with LLM(str(ckpt), device="cuda", tensor_parallel_size=2, num_kv_blocks=32,
                 max_num_seqs=4) as llm:
            tokens = llm.generate(["hi"], params)[0].outputs[0].token_ids
        print(f"engine {i}: {tokens}, made + run + closed in {time.perf_counter() - t:.1f} s, "
              f"parked groups {len(rank_group._idle)}", flush=True)
    t = time.perf_counter()
    rank_group.close_idle_groups()
    print(f"teardown: {time.perf_counter() - t:.1f} s, default group still up: "
          f"{dist.is_initialized()}", flush=True)


if __name__ == "__main__":
    main()
