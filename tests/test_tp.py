"""Tensor parallel on the CPU (gloo), every rank in a worker process: greedy output at TP=2 and
TP=4 equals TP=1 for a GQA family (llama; KV heads replicated at TP=4), fused-checkpoint families
(phi3, gpt_neox) and the MoE family (mixtral); every parameter's shards reassemble bit for bit
(verify_sharding); planted sharding bugs are caught and named; a failing or killed worker is a
TPWorkerError in the caller, which goes on and opens a new engine; engines of different sizes
follow one another in one process; SIGTERM leaves no orphaned worker; workers started by
torchrun serve a driver; unshardable sizes are ConfigErrors.

Bugs are planted in the worker processes through tests/tp_plants.py (a sitecustomize the
workers import at start-up), never in the engine's code.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from tp_plants import plant_in_workers

from engine import LLM, SamplingParams
from engine.config import check_tp_config
from engine.distributed.multiproc_executor import TPWorkerError
from engine.errors import ConfigError
from engine.validate.sharding import verify_sharding
from engine.validate.tiny import tiny_llama_config

FAMILIES = ["llama", "phi3", "gpt_neox", "mixtral"]
# TP=4 repeats of what TP=2 already shows, 7-25 s each on a 2-core CPU, are marked slow (run with
# -m slow; conftest.py). TP=4 stays in the default run where it adds a case: Llama's 2 KV heads
# replicated over 4 ranks (greedy tokens and the sharding check) and the merged-part bug.
TP4_IN_DEFAULT_RUN = {"test_greedy_matches_tp1[tp4-llama]", "test_verify_sharding[tp4-llama]",
                      "test_planted_bug_is_caught[tp4-merged-wrong-rank]"}
VOCAB = 300  # padded to 384 rows at TP=2 and 512 at TP=4: padding rows exist
PROMPTS = ["hello", "the quick brown fox jumps over the lazy dog", "a",
           "tensor parallel layers own their shard of every weight"]
NEW_TOKENS = 12
REPO = Path(__file__).resolve().parent.parent


def family_config(name: str):
    from engine.validate.tiny import tiny_config_for

    cfg = tiny_llama_config() if name == "llama" else tiny_config_for(name)
    cfg.vocab_size = VOCAB
    return cfg


@pytest.fixture(scope="module")
def checkpoint(make_checkpoint):
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = make_checkpoint(family_config(name), f"tp_{name}")
        return made[name]

    return get


def greedy() -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


def tokens_of(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy())]


@pytest.fixture(scope="module")
def tp1_tokens(checkpoint):
    """Per family: TP=1 greedy tokens of PROMPTS (computed once)."""
    done: dict[str, list[list[int]]] = {}

    def get(name: str) -> list[list[int]]:
        if name not in done:
            with LLM(str(checkpoint(name)), device="cpu", num_kv_blocks=64) as llm:
                done[name] = tokens_of(llm)
        return done[name]

    return get


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"tp{n}")
def tp(request) -> int:
    return request.param


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _kv_heads(runner) -> int:
    return runner.kv_caches[0].shape[3]


# -- greedy output and sharding, every family ---------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_tp1(family, tp, checkpoint, tp1_tokens):
    with LLM(str(checkpoint(family)), device="cpu", tensor_parallel_size=tp,
             num_kv_blocks=64) as llm:
        assert tokens_of(llm) == tp1_tokens(family)
        # the KV cache holds each rank's KV heads only (replicated when fewer heads than ranks)
        cfg = family_config(family)
        kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        assert llm.engine.collective_rpc(_kv_heads) == [max(1, kv // tp)] * tp
        llm.engine.check_invariants()


# groups each family must report (beyond the common ones)
EXPECTED_GROUPS = {"llama": {"gate_up", "down"}, "phi3": {"gate_up", "down"},
                   "gpt_neox": {"up", "down"}, "mixtral": {"experts", "router"}}


@pytest.mark.parametrize("family", FAMILIES)
def test_verify_sharding(family, tp, checkpoint):
    report = verify_sharding(checkpoint(family), tp)
    assert report.ok, [(p.name, p.problem) for p in report.failures()]
    groups = {g.group: g for g in report.groups()}
    assert {"embedding", "qkv", "o_proj", "norms", "lm_head"} <= groups.keys()
    assert EXPECTED_GROUPS[family] <= groups.keys()
    assert f"padded {VOCAB}->" in groups["embedding"].sharding
    kv = getattr(family_config(family), "num_key_value_heads", None) or 4
    assert ("replicated k x" in groups["qkv"].sharding) == (kv < tp)
    assert report.logits_max_abs < 1e-4 and report.greedy_match and report.top1_agreement == 1
    assert report.to_dict()["ok"]


# -- planted bugs: caught and named --------------------------------------------------------------
@pytest.mark.parametrize("plant, group_name, words, logits_differ", [
    ("row_wrong_dim", "o_proj", "transposed: the loader cut the wrong dimension", True),
    ("merged_wrong_rank", "gate_up", "of part 1 instead", True),
    ("vocab_padding", "embedding", "differs", False),  # logits cannot see padding rows
], ids=["row-wrong-dim", "merged-wrong-rank", "vocab-padding"])
def test_planted_bug_is_caught(plant, group_name, words, logits_differ, tp, checkpoint,
                               monkeypatch, tmp_path):
    plant_in_workers(monkeypatch, tmp_path, plant)
    report = verify_sharding(checkpoint("llama"), tp)
    assert not report.ok
    rows = {g.group: g for g in report.groups()}
    assert not rows[group_name].ok and words in rows[group_name].problem
    bad = {p.group for p in report.failures()}
    assert bad == ({group_name, "lm_head"} if group_name == "embedding" else {group_name})
    assert (not report.logits_ok) == logits_differ
    # the bug lived in those workers only: new ones verify clean
    if plant == "row_wrong_dim":
        monkeypatch.delenv("APHRO_TEST_PLANT")
        assert verify_sharding(checkpoint("llama"), tp).ok


def test_parity_check_cli_shows_the_sharding_table(tp):
    """`aphro parity-check MODEL --tp N`: the engine-vs-HF tables, then the sharding table."""
    from click.testing import CliRunner

    from aphro_cli.main import cli

    result = CliRunner().invoke(cli, ["parity-check", "llama", "--tp", str(tp), "--device",
                                      "cpu", "--no-chunked", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert f"sharding over {tp} ranks" in result.output
    assert "[q | k | v]" in result.output and "argmax breaks none" in result.output


def test_kv_blocks_are_the_minimum_over_ranks(tp, checkpoint, monkeypatch, tmp_path):
    plant_in_workers(monkeypatch, tmp_path, "few_blocks_on_rank_1")
    with LLM(str(checkpoint("llama")), device="cpu", tensor_parallel_size=tp,
             max_model_len=64) as llm:
        assert llm.engine.num_kv_blocks == 7
        assert llm.generate(["hello"], greedy())[0].outputs[0].token_ids


# -- failures: an error in the caller, who goes on -------------------------------------------
def _exit_on_rank_1(runner):
    from engine.distributed.parallel_state import get_tp_rank

    if get_tp_rank() == 1:
        os._exit(3)


def test_worker_exception_is_an_error_in_the_caller(checkpoint, tp1_tokens, monkeypatch,
                                                     tmp_path):
    plant_in_workers(monkeypatch, tmp_path, "raise_on_rank_1")
    llm = LLM(str(checkpoint("llama")), device="cpu", tensor_parallel_size=2, num_kv_blocks=64)
    pids = llm.engine.executor.worker_pids()
    with pytest.raises(TPWorkerError, match=r"rank 1 (.|\n)*planted failure"):
        llm.generate(PROMPTS, greedy())
    assert not any(alive(p) for p in pids)  # every worker is gone
    assert not dist.is_initialized()  # and this process never held a group
    assert not llm.engine.requests  # the failed step's requests were aborted
    with pytest.raises(TPWorkerError):  # the engine stays failed
        llm.generate(PROMPTS, greedy())
    llm.close()
    monkeypatch.delenv("APHRO_TEST_PLANT")
    with LLM(str(checkpoint("llama")), device="cpu", tensor_parallel_size=2,
             num_kv_blocks=64) as again:  # the caller opens a new engine
        assert tokens_of(again) == tp1_tokens("llama")


def test_worker_exit_is_an_error_in_the_caller(checkpoint):
    with (LLM(str(checkpoint("llama")), device="cpu", tensor_parallel_size=2,
              num_kv_blocks=64) as llm,
          pytest.raises(TPWorkerError, match="rank 1 .*exited with code 3")):
        llm.engine.collective_rpc(_exit_on_rank_1)
    assert not dist.is_initialized()


def test_worker_killed_mid_generation(checkpoint, tp1_tokens):
    """SIGKILL to a worker while generate() runs: TPWorkerError naming the rank in the caller,
    the other workers stopped; a new engine then works."""
    llm = LLM(str(checkpoint("llama")), device="cpu", tensor_parallel_size=2, num_kv_blocks=64)
    pids = llm.engine.executor.worker_pids()
    killer = threading.Timer(1.0, os.kill, (pids[1], signal.SIGKILL))
    killer.start()
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    with pytest.raises(TPWorkerError, match=rf"rank 1 \(pid {pids[1]}\) exited"):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # bounded: each call generates 400 tokens
            llm.generate(["hello"] * 4, long)
    killer.join()
    assert not any(alive(p) for p in pids)
    llm.close()
    with LLM(str(checkpoint("llama")), device="cpu", tensor_parallel_size=2,
             num_kv_blocks=64) as again:
        assert tokens_of(again) == tp1_tokens("llama")


def _run_script(text: str, args: list[str], timeout: float, **kwargs):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    return subprocess.run([sys.executable, "-c", text, *args], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False, **kwargs)


BLOCKED_RANK_SCRIPT = """
import sys
from engine import LLM, SamplingParams
from engine.distributed.multiproc_executor import TPWorkerError
llm = LLM(sys.argv[1], device="cpu", tensor_parallel_size=2, num_kv_blocks=64)
try:
    llm.generate(["hello there"], SamplingParams(temperature=0, max_tokens=4))
except TPWorkerError as e:
    print("CAUGHT", str(e).splitlines()[0], flush=True)
"""


def test_failure_while_rank_0_is_blocked_is_an_error_not_a_hang(checkpoint, tmp_path):
    """Rank 1 fails while rank 0 is stuck in its step (as on a GPU behind a collective that
    waits for the dead rank): the caller gets rank 1's error, rank 0 is killed, and the process
    exits normally (in a subprocess: a hang fails by timeout)."""
    (tmp_path / "plant").mkdir()
    (tmp_path / "plant" / "sitecustomize.py").write_text(
        __import__("tp_plants").SITECUSTOMIZE)
    env = dict(os.environ, APHRO_TEST_PLANT="rank_0_blocks_rank_1_raises",
               PYTHONPATH=os.pathsep.join([str(tmp_path / "plant"), str(REPO)]))
    proc = subprocess.run([sys.executable, "-c", BLOCKED_RANK_SCRIPT, str(checkpoint("llama"))],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CAUGHT tensor-parallel worker rank 1 failed" in proc.stdout, proc.stderr[-3000:]


# -- lifecycle: one engine after another, SIGTERM -------------------------------------------------
SIZES_SCRIPT = """
import json, os, sys
from engine import LLM, SamplingParams
pids = []
for tp in (2, 4, 2):
    with LLM(sys.argv[1], device="cpu", tensor_parallel_size=tp, num_kv_blocks=64) as llm:
        pids += llm.engine.executor.worker_pids()
        out = llm.generate(json.loads(sys.argv[2]), SamplingParams(temperature=0, max_tokens={n},
                                                                   ignore_eos=True))
        print("TOKENS", tp, json.dumps([o.outputs[0].token_ids for o in out]), flush=True)
print("PIDS", json.dumps(pids), flush=True)
"""


def test_engines_of_different_sizes_one_after_another(checkpoint, tp1_tokens):
    proc = _run_script(SIZES_SCRIPT.format(n=NEW_TOKENS),
                       [str(checkpoint("llama")), json.dumps(PROMPTS)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    runs = [ln.split(" ", 2) for ln in lines if ln.startswith("TOKENS ")]
    assert [r[1] for r in runs] == ["2", "4", "2"]
    assert all(json.loads(r[2]) == tp1_tokens("llama") for r in runs)
    pids = json.loads(next(ln for ln in lines if ln.startswith("PIDS "))[5:])
    assert len(pids) == 8 and not any(alive(p) for p in pids)


SIGTERM_SCRIPT = """
import sys, time
from engine import LLM, SamplingParams
llm = LLM(sys.argv[1], device="cpu", tensor_parallel_size=2, num_kv_blocks=64)
print("PIDS", *llm.engine.executor.worker_pids(), flush=True)
while True:
    llm.generate(["hello"], SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
"""


def test_sigterm_leaves_no_orphaned_workers(checkpoint):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_SCRIPT, str(checkpoint("llama"))],
                            env=env, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # blocks until the engine is up (or the script died)
        assert line.startswith("PIDS"), line
        pids = [int(p) for p in line.split()[1:]]
        time.sleep(1.0)  # generating
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10  # workers notice their driver is gone within 0.5 s
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(p) for p in pids)
    finally:
        if proc.poll() is None:
            proc.kill()


# -- several machines: workers started by torchrun --------------------------------------------
def test_torchrun_workers_serve_a_driver(checkpoint, tp1_tokens, monkeypatch):
    """`torchrun ... aphro worker --connect HOST:PORT` on each machine, the driver given
    worker_address: here both ends on this machine, gloo."""
    from engine.distributed.multiproc_executor import free_port

    port = free_port()
    monkeypatch.setenv("APHRO_WORKER_KEY", os.urandom(16).hex())
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    workers = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "aphro_cli.main", "worker", "--connect", f"127.0.0.1:{port}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with LLM(str(checkpoint("llama")), device="cpu", tensor_parallel_size=2,
                 num_kv_blocks=64, worker_address=f"127.0.0.1:{port}") as llm:
            assert tokens_of(llm) == tp1_tokens("llama")
        _, err = workers.communicate(timeout=60)
        assert workers.returncode == 0, err[-3000:]
    finally:
        if workers.poll() is None:
            workers.kill()


def test_worker_address_needs_a_key(checkpoint, monkeypatch):
    monkeypatch.delenv("APHRO_WORKER_KEY", raising=False)
    with pytest.raises(ConfigError, match="APHRO_WORKER_KEY"):
        LLM(str(checkpoint("llama")), device="cpu", tensor_parallel_size=2,
            worker_address="127.0.0.1:1")


# -- sizes that cannot shard -----------------------------------------------------------------------
@pytest.mark.parametrize("fields, tp, message", [
    ({"num_attention_heads": 4, "num_key_value_heads": 4}, 3, "num_attention_heads=4"),
    ({"num_attention_heads": 6, "num_key_value_heads": 4, "hidden_size": 96}, 3,
     "num_key_value_heads=4 neither"),
    ({"num_attention_heads": 8, "num_key_value_heads": 8, "intermediate_size": 100}, 8,
     "intermediate_size=100"),
    ({}, 0, "tensor_parallel_size=0"),
])
def test_unshardable_sizes(fields, tp, message):
    with pytest.raises(ConfigError, match=message):
        check_tp_config(tiny_llama_config(**fields), tp)


def test_more_ranks_than_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="needs 2 GPUs, this machine has 1"):
        check_tp_config(tiny_llama_config(), 2, torch.device("cuda"))


def test_llm_refuses_before_starting_processes(checkpoint):
    with pytest.raises(ConfigError, match="num_attention_heads=4 is not divisible"):
        LLM(str(checkpoint("llama")), device="cpu", tensor_parallel_size=3)


# -- CUDA (NCCL), through the device tool ---------------------------------------------------------
def _needs_gpus(tp: int) -> None:
    if torch.cuda.device_count() < tp:
        pytest.skip(f"needs {tp} GPUs")


@pytest.fixture(scope="module")
def cuda_tp1_tokens(checkpoint):
    done: dict[str, list[list[int]]] = {}

    def get(name: str) -> list[list[int]]:
        if name not in done:
            with LLM(str(checkpoint(name)), device="cuda", dtype="float32", max_num_seqs=8,
                     num_kv_blocks=64) as llm:
                done[name] = tokens_of(llm)
        return done[name]

    return get


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_greedy_matches_tp1(family, tp, checkpoint, cuda_tp1_tokens):
    """float32 on the GPU (CUDA graphs, NCCL): the same tokens as TP=1."""
    _needs_gpus(tp)
    ref = cuda_tp1_tokens(family)
    with LLM(str(checkpoint(family)), device="cuda", dtype="float32", max_num_seqs=8,
             num_kv_blocks=64, tensor_parallel_size=tp) as llm:
        assert tokens_of(llm) == ref


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_verify_sharding_bf16(family, tp, checkpoint):
    _needs_gpus(tp)
    report = verify_sharding(checkpoint(family), tp, device="cuda", dtype="bfloat16")
    if os.environ.get("APHRO_TP_REPORT"):  # the device run keeps the figures
        with open(os.environ["APHRO_TP_REPORT"], "a") as f:
            f.write(json.dumps({"family": family} | report.to_dict()) + "\n")
    assert report.params_ok, [(p.name, p.problem) for p in report.failures()]
    # bf16: argmax may differ only at near-ties of the TP=1 logits (within the tolerance)
    assert report.ok, (report.logits_max_abs, report.argmax_breaks)


CUDA_CRASH_SCRIPT = """
import faulthandler, sys
faulthandler.dump_traceback_later(120, exit=True)  # a hang shows every thread's stack
from engine import LLM, SamplingParams
from engine.distributed.multiproc_executor import TPWorkerError
llm = LLM(sys.argv[1], device="cuda", tensor_parallel_size=2, num_kv_blocks=64, max_num_seqs=4)
try:
    llm.generate(["hello there"], SamplingParams(temperature=0, max_tokens=4))
except TPWorkerError as e:
    print("CAUGHT", str(e).splitlines()[0], flush=True)
llm.close()
import os
os.environ.pop("APHRO_TEST_PLANT")
with LLM(sys.argv[1], device="cuda", tensor_parallel_size=2, num_kv_blocks=64) as again:
    print("AGAIN", len(again.generate(["hi"], SamplingParams(max_tokens=2))), flush=True)
"""


@pytest.mark.cuda
def test_cuda_worker_failure_is_an_error_not_a_hang(checkpoint, tmp_path):
    """Rank 1 raises inside a step while rank 0's all-reduce waits for it: the caller gets
    TPWorkerError, its process opens a new NCCL engine and exits normally."""
    _needs_gpus(2)
    (tmp_path / "plant").mkdir()
    (tmp_path / "plant" / "sitecustomize.py").write_text(
        __import__("tp_plants").SITECUSTOMIZE)
    env = dict(os.environ, APHRO_TEST_PLANT="raise_on_rank_1",
               PYTHONPATH=os.pathsep.join([str(tmp_path / "plant"), str(REPO)]))
    proc = subprocess.run([sys.executable, "-c", CUDA_CRASH_SCRIPT, str(checkpoint("llama"))],
                          env=env, capture_output=True, text=True, timeout=150, check=False)
    assert proc.returncode == 0, proc.stderr[-8000:]
    assert "CAUGHT tensor-parallel worker rank 1" in proc.stdout, proc.stderr[-8000:]
    assert "AGAIN 1" in proc.stdout
    assert not re.search("Traceback", proc.stdout)
