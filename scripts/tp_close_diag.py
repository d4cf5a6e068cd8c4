"""Diagnose NCCL group teardown: two TP=2 engines one after the other on a tiny Llama."""
import sys, tempfile, time, traceback
import torch.distributed as dist
from engine import LLM, SamplingParams
from engine.tiny import make_tiny_checkpoint, tiny_llama_config
import engine.executor as ex

orig = ex.leave_group
def loud(backend):
    abort = dist.distributed_c10d._abort_process_group
    t = time.time()
    try:
        import torch; torch.cuda.synchronize(); abort()
        print("abort ok", time.time() - t, "init:", dist.is_initialized(), flush=True)
    except BaseException:
        traceback.print_exc(); print("init:", dist.is_initialized(), flush=True)
ex.leave_group = loud
d = make_tiny_checkpoint(tiny_llama_config(), tempfile.mkdtemp())
for i in range(2):
    t = time.time()
    llm = LLM(str(d), device="cuda", tensor_parallel_size=2, num_kv_blocks=32, max_num_seqs=4)
    print(i, llm.generate(["hi"], SamplingParams(max_tokens=4, temperature=0))[0].outputs[0].token_ids, flush=True)
    llm.close(); print(i, "closed in", time.time() - t, "init:", dist.is_initialized(), flush=True)
print("done", flush=True)
