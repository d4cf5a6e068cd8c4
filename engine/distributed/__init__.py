"""The executor and the distributed runtime: what runs the model on every tensor-parallel rank.

    create_executor(config)  TP=1: the ModelRunner itself, in this process; TP=N: a
                             MultiprocExecutor with N worker processes (rank 0 included)
    multiproc_executor.py    starts, feeds and stops the workers; TPWorkerError
    worker.py                a worker process: connect, join the group, build a runner, serve
    shm_broadcast.py         the shared-memory ring each step's batch is broadcast through
    parallel_state.py        this process's rank, size and group; the collectives layers call

Both executors have the same methods: determine_num_blocks, init_kv_cache, execute, observe,
take_observations, collective_rpc, close, and load_report.
"""

from __future__ import annotations

from engine.config import EngineConfig


def create_executor(config: EngineConfig):
    if config.tp_size == 1 and config.parallel.worker_address is None:
        from engine.runner.model_runner import ModelRunner

        return ModelRunner(config)
    from engine.distributed.multiproc_executor import MultiprocExecutor

    return MultiprocExecutor(config)


def __getattr__(name: str):
    if name == "TPWorkerError":
        from engine.distributed.multiproc_executor import TPWorkerError

        return TPWorkerError
    raise AttributeError(name)
