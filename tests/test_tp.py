"""Tensor parallel on the CPU (gloo): greedy output at TP=2 and TP=4 equals TP=1 for a GQA
family (llama; KV heads replicated at TP=4), fused-checkpoint families (phi3, gpt_neox) and the
MoE family (mixtral); every parameter's shards reassemble bit for bit (verify_sharding); planted
sharding bugs are caught and named; a failing worker is an error in the driver, never a hang;
torchrun's rendezvous starts the same workers; unshardable sizes are ConfigErrors.

Starting ranks costs seconds, so the TP=2 and TP=4 process groups are started once and shared
by every case of that size (pytest runs a module-scoped parameter's cases together).
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from engine import LLM, SamplingParams, llm_engine
from engine.distributed import get_tp_rank
from engine.errors import ConfigError
from engine.executor import Executor
from engine.layers.linear import MergedColumnParallelLinear, RowParallelLinear, load_shard
from engine.layers.vocab_embedding import VocabParallelEmbedding
from engine.runner.model_runner import ModelRunner
from engine.rank_group import RankGroup, TPWorkerError, check_tp_config
from engine.validate.tiny import tiny_llama_config
from engine.validate.sharding import verify_sharding
from engine.worker import Worker

FAMILIES = ["llama", "phi3", "gpt_neox", "mixtral"]
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


@pytest.fixture(scope="module")
def tp1_tokens(checkpoint):
    """Per family: TP=1 greedy tokens of PROMPTS (computed once)."""
    done: dict[str, list[list[int]]] = {}

    def get(name: str) -> list[list[int]]:
        if name not in done:
            llm = LLM(str(checkpoint(name)), device="cpu", num_kv_blocks=64)
            done[name] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy())]
            llm.engine.close()
        return done[name]

    return get


class SharedGroup:
    """One live RankGroup at a time (torch.distributed has one default group per process)."""

    def __init__(self) -> None:
        self.group: RankGroup | None = None

    def get(self, size: int, device: str = "cpu") -> RankGroup:
        backend = "nccl" if device == "cuda" else "gloo"
        if (self.group is None or self.group.size != size or self.group.closed
                or self.group.backend != backend):
            self.close()
            self.group = RankGroup(size, device)
        return self.group

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None


@pytest.fixture(scope="module")
def shared():
    s = SharedGroup()
    yield s
    s.close()


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"tp{n}")
def tp(request) -> int:
    return request.param


@pytest.fixture
def group(tp, shared) -> RankGroup:
    return shared.get(tp)


@pytest.fixture
def engines(group, monkeypatch):
    """LLMs of tensor_parallel_size > 1 run on the shared group (rank_init optional)."""
    made = []

    def make(ckpt: Path, rank_init=None, **kwargs) -> LLM:
        def executor(cfg):
            if cfg.tensor_parallel_size == 1:
                return Executor(cfg)
            return Executor(cfg, rank_init=rank_init, group=group)

        monkeypatch.setattr(llm_engine, "Executor", executor)
        llm = LLM(str(ckpt), device="cpu", tensor_parallel_size=group.size,
                  **({"num_kv_blocks": 64} | kwargs))
        made.append(llm)
        return llm

    yield make
    for llm in made:
        llm.engine.close()


# -- greedy output and sharding, every family ---------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_tp1(family, tp, engines, checkpoint, tp1_tokens):
    llm = engines(checkpoint(family))
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy())]
    assert got == tp1_tokens(family)
    # the KV cache holds this rank's KV heads only (replicated when fewer heads than ranks)
    cfg = family_config(family)
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    assert llm.engine.worker.runner.kv_caches[0].shape[3] == max(1, kv // tp)
    llm.engine.check_invariants()


# groups each family must report (beyond the common ones)
EXPECTED_GROUPS = {"llama": {"gate_up", "down"}, "phi3": {"gate_up", "down"},
                   "gpt_neox": {"up", "down"}, "mixtral": {"experts", "router"}}


@pytest.mark.parametrize("family", FAMILIES)
def test_verify_sharding(family, tp, group, checkpoint):
    report = verify_sharding(checkpoint(family), tp, group=group)
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
_ROW_LOADER = RowParallelLinear.weight_loader
_MERGED_LOADER = MergedColumnParallelLinear.weight_loader
_VOCAB_LOADER = VocabParallelEmbedding.weight_loader


def _row_cuts_wrong_dim(self, param, loaded, shard_id=None):
    if param.dim() == 2 and loaded.shape[0] == loaded.shape[1]:  # square: no shape error
        load_shard(param.data, loaded.t(), 1, self.tp_rank, self.input_size)
    else:
        _ROW_LOADER(self, param, loaded, shard_id)


def _merged_takes_wrong_rank(self, param, loaded, shard_id=None):
    if shard_id != 1:
        return _MERGED_LOADER(self, param, loaded, shard_id)
    tp, full = self.tp_size, self.output_sizes[1]
    load_shard(param.data.narrow(0, self.output_sizes[0] // tp, full // tp), loaded, 0,
               tp - 1 - self.tp_rank, full)


def _vocab_padding_not_zero(self, param, loaded, shard_id=None):
    _VOCAB_LOADER(self, param, loaded, shard_id)
    rows = max(0, min(self.vocab_end, self.num_embeddings) - self.vocab_start)
    param.data[rows:] = 1.0


def _patch(cls, fn):
    old = cls.weight_loader
    cls.weight_loader = fn
    return functools.partial(setattr, cls, "weight_loader", old)


def plant_row_wrong_dim():
    return _patch(RowParallelLinear, _row_cuts_wrong_dim)


def plant_merged_wrong_rank():
    return _patch(MergedColumnParallelLinear, _merged_takes_wrong_rank)


def plant_vocab_padding():
    return _patch(VocabParallelEmbedding, _vocab_padding_not_zero)


@pytest.mark.parametrize("plant, group_name, words, logits_differ", [
    (plant_row_wrong_dim, "o_proj", "transposed: the loader cut the wrong dimension", True),
    (plant_merged_wrong_rank, "gate_up", "of part 1 instead", True),
    (plant_vocab_padding, "embedding", "differs", False),  # logits cannot see padding rows
], ids=["row-wrong-dim", "merged-wrong-rank", "vocab-padding"])
def test_planted_bug_is_caught(plant, group_name, words, logits_differ, tp, group, checkpoint):
    report = verify_sharding(checkpoint("llama"), tp, group=group, rank_init=plant)
    assert not report.ok
    rows = {g.group: g for g in report.groups()}
    assert not rows[group_name].ok and words in rows[group_name].problem
    bad = {p.group for p in report.failures()}
    assert bad == ({group_name, "lm_head"} if group_name == "embedding" else {group_name})
    assert (not report.logits_ok) == logits_differ
    # the bug was removed again on every rank: the same group now verifies clean
    if plant is plant_row_wrong_dim:
        assert verify_sharding(checkpoint("llama"), tp, group=group).ok


def test_parity_check_cli_shows_the_sharding_table(tp, group, monkeypatch):
    """`aphro parity-check MODEL --tp N`: the engine-vs-HF tables, then the sharding table."""
    from click.testing import CliRunner

    import engine.validate.sharding
    from aphro_cli.main import cli

    monkeypatch.setattr(llm_engine, "Executor", lambda cfg: Executor(cfg) if
                        cfg.tensor_parallel_size == 1 else Executor(cfg, group=group))
    monkeypatch.setattr(engine.validate.sharding, "verify_sharding",
                        functools.partial(engine.validate.sharding.verify_sharding, group=group))
    result = CliRunner().invoke(cli, ["parity-check", "llama", "--tp", str(tp), "--device",
                                      "cpu", "--no-chunked", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert f"sharding over {tp} ranks" in result.output
    assert "[q | k | v]" in result.output and "argmax breaks none" in result.output


def _few_blocks_on_rank_1():
    if get_tp_rank() != 1:
        return None
    old = Worker.num_kv_blocks
    Worker.num_kv_blocks = lambda self, cache: 7
    return functools.partial(setattr, Worker, "num_kv_blocks", old)


def test_kv_blocks_are_the_minimum_over_ranks(tp, engines, checkpoint):
    llm = engines(checkpoint("llama"), rank_init=_few_blocks_on_rank_1, max_model_len=64)
    assert llm.engine.cache_config.num_blocks == 7
    assert llm.generate(["hello"], greedy())[0].outputs[0].token_ids


# -- failures ------------------------------------------------------------------------------------
def _raise_in_step_on_rank_1():
    if get_tp_rank() != 1:
        return None
    old = ModelRunner.execute

    def execute(self, inp):
        raise ValueError("planted failure in rank 1's step")

    ModelRunner.execute = execute
    return functools.partial(setattr, ModelRunner, "execute", old)


def _block_driver_and_fail_rank_1():
    """Rank 1 raises in its step while the driver is stuck inside its own (as a driver waiting
    on the GPU behind a collective that needs rank 1 would be)."""
    if get_tp_rank() == 1:
        return _raise_in_step_on_rank_1()
    old = ModelRunner.execute
    ModelRunner.execute = lambda self, inp: time.sleep(600)
    return functools.partial(setattr, ModelRunner, "execute", old)


def _exit_on_rank_1(worker):
    if get_tp_rank() == 1:
        os._exit(3)


def test_worker_exception_is_an_error_in_the_driver(shared, checkpoint, monkeypatch):
    shared.close()  # this test needs its own group: the failure closes it
    monkeypatch.setattr(llm_engine, "Executor",
                        lambda cfg: Executor(cfg, rank_init=_raise_in_step_on_rank_1))
    llm = LLM(str(checkpoint("llama")), device="cpu", tensor_parallel_size=2, num_kv_blocks=64)
    group = llm.engine.executor._group
    with pytest.raises(TPWorkerError, match=r"rank 1 .*exited with code 1(.|\n)*planted failure"):
        llm.generate(PROMPTS, greedy())
    assert group.closed and all(p.poll() is not None for p in group.procs)
    assert not dist.is_initialized()
    with pytest.raises(TPWorkerError):  # the engine stays failed
        llm.generate(PROMPTS, greedy())


def test_worker_exit_is_an_error_in_the_driver(shared, checkpoint):
    shared.close()
    from engine.worker import WorkerConfig

    ex = Executor(WorkerConfig(str(checkpoint("llama")), device="cpu", tensor_parallel_size=2))
    with pytest.raises(TPWorkerError, match="rank 1 .*exited with code 3"):
        ex.collective_rpc(_exit_on_rank_1)
    assert not dist.is_initialized()
    ex.close()


# -- torchrun ------------------------------------------------------------------------------------
TORCHRUN_SCRIPT = """
import json, sys
from engine import LLM, SamplingParams
llm = LLM(sys.argv[1], device="cpu", tensor_parallel_size=2, num_kv_blocks=64)
# only rank 0 gets here: the other ranks serve it inside LLM() and leave when it closes
out = llm.generate(json.loads(sys.argv[2]), SamplingParams(temperature=0, max_tokens={n},
                                                           ignore_eos=True))
print("TOKENS", json.dumps([o.outputs[0].token_ids for o in out]), flush=True)
llm.engine.close()
"""


def test_torchrun_rendezvous(checkpoint, tp1_tokens, tmp_path):
    script = tmp_path / "tp_torchrun.py"
    script.write_text(textwrap.dedent(TORCHRUN_SCRIPT.format(n=NEW_TOKENS)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get(
        "PYTHONPATH", "")]))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(script), str(checkpoint("llama")), json.dumps(PROMPTS)],
        env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("TOKENS ")]
    assert len(lines) == 1  # rank 0 alone
    assert json.loads(lines[0][len("TOKENS "):]) == tp1_tokens("llama")


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
def _cuda_group(shared, tp: int) -> RankGroup:
    if torch.cuda.device_count() < tp:
        pytest.skip(f"needs {tp} GPUs")
    return shared.get(tp, "cuda")


@pytest.fixture(scope="module")
def cuda_tp1_tokens(checkpoint):
    done: dict[str, list[list[int]]] = {}

    def get(name: str) -> list[list[int]]:
        if name not in done:
            llm = LLM(str(checkpoint(name)), device="cuda", dtype="float32", max_num_seqs=8,
                      num_kv_blocks=64)
            done[name] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy())]
            llm.engine.close()
        return done[name]

    return get


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_greedy_matches_tp1(family, tp, shared, checkpoint, cuda_tp1_tokens, monkeypatch):
    """float32 on the GPU (CUDA graphs, NCCL): the same tokens as TP=1."""
    group = _cuda_group(shared, tp)
    ref = cuda_tp1_tokens(family)
    monkeypatch.setattr(llm_engine, "Executor", lambda cfg: Executor(cfg, group=group))
    llm = LLM(str(checkpoint(family)), device="cuda", dtype="float32", max_num_seqs=8,
              num_kv_blocks=64, tensor_parallel_size=tp)
    try:
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy())] == ref
    finally:
        llm.engine.close()


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_verify_sharding_bf16(family, tp, shared, checkpoint):
    group = _cuda_group(shared, tp)
    report = verify_sharding(checkpoint(family), tp, device="cuda", dtype="bfloat16",
                             group=group)
    if os.environ.get("APHRO_TP_REPORT"):  # the device run keeps the figures
        with open(os.environ["APHRO_TP_REPORT"], "a") as f:
            f.write(json.dumps({"family": family} | report.to_dict()) + "\n")
    assert report.params_ok, [(p.name, p.problem) for p in report.failures()]
    # bf16: argmax may differ only at near-ties of the TP=1 logits (within the tolerance)
    assert report.ok, (report.logits_max_abs, report.argmax_breaks)


def _run_script(text: str, ckpt: Path, tmp_path: Path, grace_s: float, timeout: float):
    """Run a failure script (argv: checkpoint, tests folder) in its own process."""
    script = tmp_path / "script.py"
    script.write_text(text)
    env = dict(os.environ, PYTHONPATH=str(REPO), APHRO_TP_FAILURE_GRACE_S=str(grace_s))
    return subprocess.run([sys.executable, str(script), str(ckpt), str(Path(__file__).parent)],
                          env=env, capture_output=True, text=True, timeout=timeout, check=False)


BLOCKED_DRIVER_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[2])
from test_tp import _block_driver_and_fail_rank_1
from engine import LLM, SamplingParams, llm_engine
from engine.executor import Executor
llm_engine.Executor = lambda cfg: Executor(cfg, rank_init=_block_driver_and_fail_rank_1)
llm = LLM(sys.argv[1], device="cpu", tensor_parallel_size=2, num_kv_blocks=64)
llm.generate(["hello there"], SamplingParams(temperature=0, max_tokens=4))
print("NOT REACHED", flush=True)
"""


def test_blocked_driver_exits_with_the_workers_error(checkpoint, tmp_path):
    """A driver that cannot reach a check (blocked, as on a GPU behind a collective waiting for
    the dead rank) is ended by the monitor after the grace period, with the worker's error."""
    proc = _run_script(BLOCKED_DRIVER_SCRIPT, checkpoint("llama"), tmp_path, grace_s=2,
                       timeout=120)
    assert proc.returncode == 1 and "NOT REACHED" not in proc.stdout, proc.stderr[-3000:]
    assert re.search(r"aphro: tensor-parallel worker rank 1 .*exited with code 1(.|\n)*"
                     r"planted failure(.|\n)*blocked waiting for that rank", proc.stderr), \
        proc.stderr[-3000:]


CUDA_CRASH_SCRIPT = """
import faulthandler, sys
faulthandler.dump_traceback_later(120, exit=True)  # a hang shows every thread's stack
sys.path.insert(0, sys.argv[2])
from test_tp import _raise_in_step_on_rank_1
from engine import LLM, SamplingParams, llm_engine
from engine.executor import Executor
from engine.rank_group import TPWorkerError
llm_engine.Executor = lambda cfg: Executor(cfg, rank_init=_raise_in_step_on_rank_1)
llm = LLM(sys.argv[1], device="cuda", tensor_parallel_size=2, num_kv_blocks=64, max_num_seqs=4)
try:
    llm.generate(["hello there"], SamplingParams(temperature=0, max_tokens=4))
except TPWorkerError as e:
    print("CAUGHT", str(e).splitlines()[0], flush=True)
"""


@pytest.mark.cuda
def test_cuda_worker_failure_is_an_error_not_a_hang(shared, checkpoint, tmp_path):
    """Rank 1 raises inside a step while the driver's all-reduce waits for it: the driver
    raises, or, blocked on the GPU, is ended by the monitor with the error (in a subprocess:
    a hang fails by timeout). Passes on 2x H200 (docs/VALIDATION.md)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    shared.close()
    proc = _run_script(CUDA_CRASH_SCRIPT, checkpoint("llama"), tmp_path, grace_s=10,
                       timeout=150)
    # the failed NCCL group cannot be torn down: the process leaves without it, exit code 1;
    # a driver blocked on the GPU behind the dead rank is ended by the monitor instead
    assert proc.returncode == 1, proc.stderr[-8000:]
    if "CAUGHT" in proc.stdout:
        assert "CAUGHT tensor-parallel worker rank 1" in proc.stdout
        assert "without tearing down" in proc.stderr, proc.stderr[-8000:]
    else:
        assert re.search(r"aphro: tensor-parallel worker rank 1 (.|\n)*blocked waiting",
                         proc.stderr), proc.stderr[-8000:]


# -- parked groups -------------------------------------------------------------------------------
def test_closed_engine_parks_its_ranks_for_the_next_engine(shared, checkpoint, tp1_tokens):
    """Closing a TP engine keeps its worker processes (models released) for the next engine
    of the same size in this process; a different size stops them first."""
    from engine import rank_group

    shared.close()
    first = LLM(str(checkpoint("llama")), device="cpu", tensor_parallel_size=2, num_kv_blocks=64)
    pids = [p.pid for p in first.engine.executor._group.procs]
    first.close()
    assert len(rank_group._idle) == 1 and dist.is_initialized()
    with LLM(str(checkpoint("phi3")), device="cpu", tensor_parallel_size=2,
             num_kv_blocks=64) as second:
        assert [p.pid for p in second.engine.executor._group.procs] == pids
        assert not rank_group._idle
        got = [o.outputs[0].token_ids for o in second.generate(PROMPTS, greedy())]
        assert got == tp1_tokens("phi3")
    parked = rank_group._idle[0]
    with LLM(str(checkpoint("llama")), device="cpu", tensor_parallel_size=4,
             num_kv_blocks=64) as third:
        assert parked.closed and all(p.poll() is not None for p in parked.procs)
        assert [o.outputs[0].token_ids for o in third.generate(PROMPTS, greedy())] == \
            tp1_tokens("llama")
    rank_group.close_idle_groups()
    assert not dist.is_initialized()
