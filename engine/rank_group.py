"""The ranks of a tensor-parallel group, seen from the driver (rank 0, this process).

The ranks start in one of two ways, then speak the same protocol (engine.worker.serve):
- local (the default): the driver starts N-1 `python -c "from engine.worker import
  worker_main; worker_main()"` processes with torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR, MASTER_PORT) and hosts the TCPStore: at MASTER_ADDR:MASTER_PORT when those are
  set, else 127.0.0.1 and a port the OS picks. (Plain processes rather than multiprocessing's
  spawn, so a user's script without `if __name__ == "__main__":` is not re-run in each rank.)
- torchrun: when this process runs under torchrun (all five variables set), every process
  builds the engine and WORLD_SIZE must equal N. Rank 0 returns as the driver; the others serve
  it inside the RankGroup constructor and leave the process (SystemExit(0)) when the driver
  shuts down. Several machines are torchrun's rendezvous, nothing more.

Failures: a local worker that raises leaves its traceback in the store and exits; a monitor
thread sees any worker exit, the driver (which waits for each step's GPU work by polling, and
gloo notices a dead peer by itself) raises TPWorkerError naming the rank. A failed NCCL group
cannot be torn down (its last collective waits for the dead rank), so it is abandoned and the
process leaves at exit without teardown. Collectives wait at most
WorkerConfig.distributed_timeout_s.

Lifetime: torch.distributed holds one default group per process, and starting ranks costs
seconds, so a closed engine's group is parked here, its models released, for the next engine of
the same size; parked workers stop at exit or when a group of another size is needed (the
teardown takes under a second once the CUDA graphs are freed; docs/VALIDATION.md).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from engine.distributed import set_tensor_parallel
from engine.errors import ConfigError
from engine.worker import (
    ERROR_KEY,
    RankState,
    init_groups,
    leave_group,
    resolve_device,
    send,
    serve,
)

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_WORKER_CODE = "from engine.worker import worker_main; worker_main()"
_POLL_S = 0.05
# A driver inside a group operation when a worker dies raises at its next check; one still
# inside after this long is blocked where no check runs (on the GPU, behind a collective that
# waits for the dead rank), and the monitor ends the process with the error instead of a hang.
FAILURE_GRACE_S = float(os.environ.get("APHRO_TP_FAILURE_GRACE_S", "20"))


class TPWorkerError(RuntimeError):
    """A tensor-parallel worker process failed; its group is closed afterwards."""


def _first_int(cfg, *names: str) -> int | None:
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def check_tp_config(hf_config, tp: int, device: torch.device | None = None) -> None:
    """Raise ConfigError when the model cannot be split over `tp` ranks (checked before any
    process starts; the layers check again as they are built)."""
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ConfigError(f"tensor_parallel_size={tp!r}: must be an integer >= 1")
    if tp == 1:
        return
    hint = "choose a tensor_parallel_size that divides it"
    heads = _first_int(hf_config, "num_attention_heads", "n_head", "num_heads")
    if heads is not None and heads % tp:
        raise ConfigError(f"num_attention_heads={heads} is not divisible by "
                          f"tensor_parallel_size={tp}: {hint}")
    kv = 1 if getattr(hf_config, "multi_query", False) else \
        _first_int(hf_config, "num_key_value_heads", "num_kv_heads", "n_head_kv")
    if kv is not None and kv % tp and tp % kv:
        raise ConfigError(f"num_key_value_heads={kv} neither is divisible by nor divides "
                          f"tensor_parallel_size={tp}: KV heads are split when there are more "
                          "than ranks and replicated when fewer; choose a size that fits")
    for name in ("intermediate_size", "n_inner", "ffn_dim", "moe_intermediate_size",
                 "shared_expert_intermediate_size"):
        size = _first_int(hf_config, name)
        if size is not None and size % tp:
            raise ConfigError(f"{name}={size} is not divisible by tensor_parallel_size={tp}: "
                              f"{hint}")
    if device is not None and device.type == "cuda" and _torchrun_env() is None:
        count = torch.cuda.device_count()
        if tp > count:
            raise ConfigError(f"tensor_parallel_size={tp} needs {tp} GPUs, this machine has "
                              f"{count}: lower it, or start the ranks on several machines with "
                              "torchrun")


def _torchrun_env() -> dict[str, str] | None:
    if all(k in os.environ for k in TORCHRUN_VARS):
        return {k: os.environ[k] for k in TORCHRUN_VARS}
    return None


class RankGroup:
    """The driver's side of N ranks: worker processes, store, process groups, a monitor.

    An Executor makes its own; tests share one between Executors of different models
    (`Executor(cfg, group=g)`), since starting processes costs seconds. Under torchrun, ranks
    other than 0 serve the driver inside the constructor and then leave the process.
    """

    def __init__(self, size: int, device: str = "auto", timeout_s: float = 600.0) -> None:
        close_idle_groups()  # a parked group of another size (torch allows one per process)
        if dist.is_initialized():
            raise ConfigError("a tensor-parallel group is already running in this process: "
                              "close() its engine first"
                              + ("; an NCCL group that could not be shut down stays until "
                                 "the process exits" if _nccl_stuck else ""))
        self.size = size
        self.backend = "nccl" if resolve_device(device).type == "cuda" else "gloo"
        if self.backend == "nccl":
            global _nccl_used
            _nccl_used = True
        self.procs: list[subprocess.Popen] = []
        self.store = None
        self.failure: str | None = None
        self.closed = False
        self.busy = 0  # depth of the driver's group operations (run) in progress
        self.owner: object | None = None  # the token of the Executor using the ranks now
        timeout = datetime.timedelta(seconds=timeout_s)
        env = _torchrun_env()
        try:
            if env is None:
                self.local_rank = 0
                self._start_local(timeout)
                self.control = init_groups(self.backend, 0, size, timeout, self.store)
            else:
                self._join_torchrun(env, timeout)
        except BaseException:
            self.close(graceful=False)
            raise
        self.driver = RankState(0, size, self.local_rank, self.control)
        atexit.register(self.close)

    def _join_torchrun(self, env: dict[str, str], timeout: datetime.timedelta) -> None:
        if int(env["WORLD_SIZE"]) != self.size:
            raise ConfigError(f"torchrun started WORLD_SIZE={env['WORLD_SIZE']} processes but "
                              f"tensor_parallel_size={self.size}: they must be equal")
        rank, self.local_rank = int(env["RANK"]), int(env["LOCAL_RANK"])
        if self.backend == "nccl":
            if self.local_rank >= torch.cuda.device_count():
                raise ConfigError(f"LOCAL_RANK={self.local_rank} but this machine has "
                                  f"{torch.cuda.device_count()} GPUs")
            torch.cuda.set_device(self.local_rank)
        self.control = init_groups(self.backend, rank, self.size, timeout)
        if rank != 0:
            serve(rank, self.size, self.local_rank, self.control)
            raise SystemExit(0)

    def _start_local(self, timeout: datetime.timedelta) -> None:
        addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = int(os.environ.get("MASTER_PORT", "0"))  # 0: the OS picks a free port
        self.store = dist.TCPStore(addr, port, self.size, is_master=True, timeout=timeout,
                                   wait_for_workers=False)
        if self.backend == "nccl":
            torch.cuda.set_device(0)
        env = dict(os.environ, WORLD_SIZE=str(self.size), MASTER_ADDR=addr,
                   MASTER_PORT=str(self.store.port), APHRO_TP_BACKEND=self.backend,
                   APHRO_TP_TIMEOUT_S=str(timeout.total_seconds()),
                   PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        if self.backend == "gloo":  # CPU ranks share the cores
            env["APHRO_TP_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.size))
        for rank in range(1, self.size):
            env.update(RANK=str(rank), LOCAL_RANK=str(rank))
            proc = subprocess.Popen([sys.executable, "-c", _WORKER_CODE], env=env)
            self.procs.append(proc)
            self._watch(rank, proc)
        keys = [f"aphro/joined/{r}" for r in range(1, self.size)]
        deadline = time.monotonic() + timeout.total_seconds()
        while not self.store.check(keys):  # never block on a worker that died starting
            if (err := self.error(wait_s=0)) is not None:
                raise err
            if time.monotonic() > deadline:
                raise TPWorkerError(f"tensor-parallel workers did not start within "
                                    f"{timeout.total_seconds():.0f} s")
            time.sleep(_POLL_S)

    def _watch(self, rank: int, proc: subprocess.Popen) -> None:
        def wait() -> None:
            code = proc.wait()
            if self.closed or self.failure is not None:
                return
            self.failure = (f"tensor-parallel worker rank {rank} (pid {proc.pid}) exited with "
                            f"code {code}")
            # NCCL: no abort here. Aborting a communicator that the driver's CUDA graphs
            # captured blocks (scripts/nccl_teardown_diag.py on 4x H200); a driver that polls
            # for the step's end (wait_device) or waits on gloo sees `failure` by itself.
            self._exit_if_stuck()

        threading.Thread(target=wait, name=f"aphro-tp-watch-{rank}", daemon=True).start()

    def _exit_if_stuck(self) -> None:
        """(Monitor thread.) Give a driver inside a group operation FAILURE_GRACE_S to raise the
        failure; if it is still inside, it is blocked for good: print the error and exit 1."""
        deadline = time.monotonic() + FAILURE_GRACE_S
        while self.busy and not self.closed and time.monotonic() < deadline:
            time.sleep(_POLL_S)
        if not self.busy or self.closed:
            return
        print(f"aphro: {self.error()}\naphro: the driver is blocked waiting for that rank "
              f"(more than {FAILURE_GRACE_S:g} s); exiting", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)

    def error(self, wait_s: float = 0.0) -> TPWorkerError | None:
        """A worker's failure as an exception, waiting up to wait_s for the monitor to see the
        exit (a collective can fail a moment before the process is gone)."""
        deadline = time.monotonic() + wait_s
        while self.failure is None and self.procs and time.monotonic() < deadline:
            time.sleep(_POLL_S)
        if self.failure is None:
            return None
        details = []
        for rank in range(1, len(self.procs) + 1):
            with contextlib.suppress(RuntimeError):
                if self.store is not None and self.store.check([ERROR_KEY.format(rank)]):
                    details.append(self.store.get(ERROR_KEY.format(rank)).decode("utf-8",
                                                                                 "replace"))
        return TPWorkerError(self.failure + (":\n" + "\n".join(details) if details
                                             else " (see its output above)"))

    def check(self) -> None:
        if self.closed:
            raise TPWorkerError(self.failure or "the tensor-parallel group is closed")
        if (err := self.error()) is not None:
            self.close(graceful=False)
            raise err

    def run(self, fn: Callable, *args):
        """fn(*args) on the driver; a failure here or in a worker closes the group and is raised
        as the worker's error when a worker failed."""
        self.check()
        self.busy += 1
        try:
            out = fn(*args)
        except BaseException as e:
            self.busy -= 1
            err = self.error(wait_s=5.0 if isinstance(e, RuntimeError) else 0.0)
            self.close(graceful=False)
            if err is not None:
                raise err from e
            raise
        self.busy -= 1
        self.check()
        return out

    def broadcast(self, msg: tuple) -> None:
        self.run(send, msg, self.control)

    def wait_device(self) -> None:
        """Wait for the driver's queued GPU work (NCCL collectives included) by polling, so a
        worker that dies mid-step is noticed here rather than blocking a later CUDA sync."""
        if self.backend != "nccl":
            return
        done = torch.cuda.Event()
        done.record()
        while not done.query():
            if self.failure is not None:
                self.check()
            time.sleep(20e-6)

    def close(self, graceful: bool = True, leave: bool = True) -> None:
        """Stop the workers and leave the group (idempotent). Every rank leaves on its own
        (engine.worker.leave_group: NCCL groups are aborted, a local operation), so a late or
        dead rank cannot block the others. leave=False stops the workers only."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        if self.wedged:
            self._abandon()
            return
        if graceful and self.failure is None and getattr(self, "control", None) is not None:
            try:
                send(("stop",), self.control)
            except RuntimeError:
                graceful = False
        if getattr(self, "driver", None) is not None:
            self.driver.release()
        for proc in self.procs:
            try:
                proc.wait(timeout=30 if graceful else 0.5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if leave and dist.is_initialized():  # in a thread: a stuck communicator must not hang us
            thread = threading.Thread(target=leave_group, args=(self.backend,),
                                      name="aphro-tp-leave", daemon=True)
            thread.start()
            thread.join(timeout=30)
            if dist.is_initialized():
                global _nccl_stuck
                _nccl_stuck = True
        set_tensor_parallel(0, 1, None)
        self.store = None

    @property
    def wedged(self) -> bool:
        """A failed NCCL group: abandoned by close(), never released (_abandon)."""
        return self.backend == "nccl" and self.failure is not None

    def _abandon(self) -> None:
        """A failed NCCL group: the driver's last step waits on the GPU for a dead rank, so
        neither its memory nor the communicator can be released (both block). Keep everything
        referenced, stop the other workers, and leave the process without teardown at exit."""
        _wedged.append(self)
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        global _nccl_stuck
        _nccl_stuck = True
        atexit.register(_exit_without_teardown)
        set_tensor_parallel(0, 1, None)


def _exit_without_teardown() -> None:
    print("aphro: a tensor-parallel worker failed; leaving without tearing down the NCCL group "
          "(it would block)", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


_wedged: list[RankGroup] = []  # failed NCCL groups, never released (RankGroup._abandon)

# A closed engine's ranks are parked here, their models released, for the next engine of the
# same size in this process (torch.distributed holds one default group per process, and ranks
# take seconds to start); they stop at exit, or when a group of another size is needed.
_idle: list[RankGroup] = []
_nccl_used = False
_nccl_stuck = False


def nccl_used() -> bool:
    """Whether this process has run an NCCL group (see aphro_cli.main.main's exit)."""
    return _nccl_used


def close_idle_groups(leave: bool = True) -> None:
    """Stop parked groups' workers; leave=False skips the driver's side of the teardown (for
    a process about to exit)."""
    while _idle:
        _idle.pop().close(leave=leave)


def _take_idle(size: int, backend: str) -> RankGroup | None:
    """The parked group of this size and backend, if it is still healthy; any other parked
    group stays until RankGroup() needs the process's one default group."""
    for group in _idle:
        if (group.size, group.backend) == (size, backend) and not group.closed \
                and group.failure is None:
            _idle.remove(group)
            return group
    return None


def release_ranks(group: RankGroup, token: object) -> bool:
    """Drop the model and KV cache of the executor holding `token` on every rank (the ranks
    stay). True when the group is still usable afterwards."""
    if group.owner is not token:  # a later executor has taken the group over
        return False
    group.owner = None
    try:  # a failed group is closed by broadcast; releasing goes on regardless
        with contextlib.suppress(Exception):
            if not group.closed:
                group.broadcast(("release",))
    finally:
        if not group.wedged:
            group.driver.release()
        set_tensor_parallel(0, 1, None)
    return not group.closed


def _park(group: RankGroup, token: object) -> None:
    """Release the ranks and keep the group for the next executor of its size."""
    if release_ranks(group, token):
        _idle.append(group)
