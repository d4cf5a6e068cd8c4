"""Executor: the driver (rank 0, this process) and one worker process per other TP rank.

With tensor_parallel_size=1 it only holds the in-process Worker: no process, no group. With N > 1
the ranks (engine.rank_group.RankGroup) join one torch.distributed group (NCCL on CUDA, gloo on
CPU) that carries the model's all-reduces and all-gathers, and a gloo group that carries the
driver's messages. The driver schedules; each step it broadcasts the flat batch (input ids,
positions, attention metadata: a pickled object of small arrays) and every rank runs the model
on its shard; rank 0 samples.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from engine.config import CacheConfig
from engine.distributed import set_tensor_parallel, tensor_parallel
from engine.errors import ConfigError
from engine.model_runner import ModelInput, to_device
from engine.rank_group import RankGroup, _park, _take_idle, check_tp_config, release_ranks
from engine.sequence import Sequence
from engine.worker import RankState, WorkerConfig, load_config, resolve_device, to_wire


class Executor:
    """Runs the model on every tensor-parallel rank; the LLMEngine talks only to this.

    rank_init: a picklable callable run on every rank (here and in each worker) before the
    model is built; a callable it returns runs when the executor closes. group: a RankGroup of
    tensor_parallel_size ranks to use (and leave open); by default the executor starts its own.
    """

    def __init__(self, cfg: WorkerConfig, rank_init: Callable[[], Any] | None = None,
                 group: RankGroup | None = None) -> None:
        self.tp_size = cfg.tensor_parallel_size
        self._group: RankGroup | None = None
        if self.tp_size == 1 and group is None:
            self._state = RankState(0, 1, 0, None)
            with self._tp1():
                self.driver = self._state.init(cfg, rank_init)
            return
        device = resolve_device(cfg.device)
        check_tp_config(load_config(cfg.model), self.tp_size, device)
        if group is not None and (group.size != self.tp_size or group.closed):
            raise ConfigError(f"the RankGroup given has {group.size} ranks"
                              f"{' and is closed' if group.closed else ''}; "
                              f"tensor_parallel_size={self.tp_size}")
        self._pooled = group is None
        backend = "nccl" if device.type == "cuda" else "gloo"
        if group is None:
            group = _take_idle(self.tp_size, backend) or RankGroup(
                self.tp_size, cfg.device, cfg.distributed_timeout_s)
        self._group = group
        self._token = group.owner = object()  # a later Executor on the group takes over
        if self._pooled:
            self._finalizer = weakref.finalize(self, _park, group, self._token)
        self._state = group.driver
        set_tensor_parallel(0, self.tp_size, dist.group.WORLD)
        try:
            self._group.broadcast(("init", cfg, rank_init))
            self.driver = self._group.run(self._state.init, cfg, rank_init)
        except BaseException:
            self.close()
            raise

    def _tp1(self):
        """TP=1 models run with the TP=1 state, even beside a live group in this process."""
        return tensor_parallel(0, 1, None)

    @property
    def hf_config(self):
        return self.driver.hf_config

    @property
    def tokenizer(self):
        return self.driver.tokenizer

    @property
    def eos_token_ids(self) -> list[int]:
        return self.driver.eos_token_ids

    @property
    def max_model_len(self) -> int:
        return self.driver.max_model_len

    def init_kv_cache(self, cache: CacheConfig) -> int:
        """Allocate every rank's KV cache (its KV heads) with the smallest rank's block count."""
        if self._group is None:
            with self._tp1():
                return self.driver.init_kv_cache(cache)
        self._group.broadcast(("kv", cache))
        return self._group.run(self._state.init_kv_cache, cache)

    def prepare(self, scheduled: list[tuple[Sequence, int]]) -> ModelInput:
        if self._group is not None:
            self._group.check()  # a failed group's driver may have no model left to prepare
        if self._group is None:
            return self.driver.prepare(scheduled)
        host = self.driver.prepare_host(scheduled)  # sent as built: no copy back from the GPU
        self._group.broadcast(("step", to_wire(host)))
        return to_device(host, self.driver.device)

    def execute(self, model_input: ModelInput):
        """(logits, prompt_logits) on the driver; every other rank runs the same step."""
        if self._group is None:
            with self._tp1():
                return self.driver.execute(model_input)
        out = self._group.run(self.driver.execute, model_input)
        self._group.run(self._group.wait_device)
        return out

    def collective_rpc(self, fn: str | Callable, *args) -> list:
        """fn(worker, *args), or worker.fn(*args) for a name, on every rank; results by rank.
        fn must pickle (a Worker method name or a module-level function)."""
        if self._group is None:
            with self._tp1():
                return [self._state.call(fn, args)]
        self._group.broadcast(("call", fn, args))
        mine = self._group.run(self._state.call, fn, args)
        out = [None] * self.tp_size
        self._group.run(dist.gather_object, mine, out, 0, self._group.control)
        return out

    def close(self) -> None:
        """Release the model and KV cache on every rank; idempotent. A group this executor
        started is parked for the next executor of its size (engine.rank_group); a group it
        was given stays with whoever gave it."""
        group, self._group = self._group, None
        if group is None:
            self._state.release()
        elif self._pooled:
            self._finalizer()  # _park
        else:
            release_ranks(group, self._token)
        self.driver = None
