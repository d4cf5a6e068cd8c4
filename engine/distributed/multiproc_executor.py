"""Tensor parallel across worker processes: every rank, rank 0 included, is a child process
this executor starts and owns (as vLLM's multiprocess executor), so the caller's process holds
no communicator and closing an engine is stopping and joining processes.

The driver (this process) listens on a socket; each worker connects, says its rank, and gets
the EngineConfig. Each step the driver pickles the StepBatch into a shared-memory ring that
every local worker reads (engine.distributed.shm_broadcast) and waits for rank 0's sampled
tokens on its connection, watching every worker's connection at once: a worker that reports an
error, or whose connection closes because it died, is a TPWorkerError naming the rank with its
traceback, after which the executor is closed (its workers killed) and the caller's process goes
on. `close()` sends stop, joins the workers for ParallelConfig.shutdown_timeout_s, then kills
what is left.

Several machines: with ParallelConfig.worker_address the executor starts no process and waits
for WORLD_SIZE workers that torchrun started (`aphro worker --connect HOST:PORT`, README); they
receive every message over their connection.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener, wait
from typing import Any

from engine.config import EngineConfig
from engine.core.batch import RunnerOutput, StepBatch
from engine.distributed.shm_broadcast import ShmBroadcast
from engine.distributed.worker import ENV_ADDRESS, ENV_KEY, ENV_PARENT, parse_address, recv, send
from engine.errors import ConfigError
from engine.runner.observer import Observations, ObserveSpec

_WORKER_CODE = "from engine.distributed.worker import main; main()"
_MIN_SLOT = 1 << 20
_MAX_SLOT = 1 << 24


class TPWorkerError(RuntimeError):
    """A tensor-parallel worker failed or died; the engine that used it is closed."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accept_all(listener: Listener, count: int, out: queue.Queue) -> None:
    """(Thread.) Accept `count` connections; ends when the listener is closed."""
    accepted = 0
    while accepted < count:
        try:
            out.put(listener.accept())
        except AuthenticationError:  # not one of ours: keep listening
            continue
        except (OSError, EOFError):  # the listener was closed
            return
        accepted += 1


def _slot_bytes(config: EngineConfig) -> int:
    """A shared-memory slot that holds an ordinary step's batch; larger ones travel beside."""
    s = config.scheduler
    blocks = -(-config.max_model_len // config.cache.block_size)
    need = 24 * s.max_num_batched_tokens + 4 * s.max_num_seqs * blocks + 128 * s.max_num_seqs
    return min(max(2 * need, _MIN_SLOT), _MAX_SLOT)


class _Workers:
    """The processes and connections; closed by close() or, if forgotten, at garbage
    collection or interpreter exit (weakref.finalize), never later."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.conns: dict[int, Connection] = {}
        self.shm: ShmBroadcast | None = None
        self.listener: Listener | None = None
        self.socket_dir: str | None = None

    def shutdown(self, graceful: bool, timeout_s: float) -> None:
        if graceful and self.conns:
            stop = pickle.dumps(("stop",), protocol=5)
            with contextlib.suppress(Exception):
                for conn in self.conns.values():
                    if self.shm is None:
                        conn.send_bytes(stop)
                if self.shm is not None:
                    self.shm.write(stop)
        deadline = time.monotonic() + (timeout_s if graceful else 0)
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if not self.procs and graceful:  # workers started elsewhere: their last answer
            pending = list(self.conns.values())
            while pending and time.monotonic() < deadline:
                for conn in wait(pending, timeout=max(0.0, deadline - time.monotonic())):
                    pending.remove(conn)
        for conn in self.conns.values():
            conn.close()
        self.conns.clear()
        if self.shm is not None:
            self.shm.close(unlink=True)
            self.shm = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.socket_dir is not None:
            with contextlib.suppress(OSError):
                os.rmdir(self.socket_dir)
            self.socket_dir = None


class _Reply:
    def __init__(self, executor: MultiprocExecutor) -> None:
        self.executor = executor

    def result(self) -> RunnerOutput:
        return self.executor._gather([0])[0]


class MultiprocExecutor:
    def __init__(self, config: EngineConfig) -> None:
        self.config, self.world = config, config.tp_size
        self.failure: str | None = None
        self._w = _Workers()
        self._finalizer = weakref.finalize(self, self._w.shutdown, False, 0.0)
        try:
            self._start()
        except BaseException:
            self._w.shutdown(graceful=False, timeout_s=0)
            raise

    # -- start -------------------------------------------------------------------------------
    def _start(self) -> None:
        cfg, w = self.config, self._w
        try:
            pickle.dumps(cfg.model_class)
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            raise ConfigError(f"the model class {cfg.model_class!r} cannot be sent to the "
                              "tensor-parallel workers (they import it by name): register it "
                              "as 'package.module:Class' from an importable module") from e
        external = cfg.parallel.worker_address is not None
        if external:
            key_hex = os.environ.get(ENV_KEY)
            if not key_hex:
                raise ConfigError(f"worker_address={cfg.parallel.worker_address!r}: set {ENV_KEY} "
                                  "to a shared secret (hex), the same for the workers")
            key = bytes.fromhex(key_hex)
            w.listener = Listener(parse_address(cfg.parallel.worker_address), authkey=key)
        else:
            key = secrets.token_bytes(32)
            w.socket_dir = tempfile.mkdtemp(prefix="aphro-tp-")
            w.listener = Listener(os.path.join(w.socket_dir, "driver.sock"), "AF_UNIX",
                                  authkey=key)
            self._spawn(w.listener.address, key.hex())
        deadline = time.monotonic() + cfg.parallel.distributed_timeout_s
        accepted: queue.Queue = queue.Queue()
        threading.Thread(target=_accept_all, args=(w.listener, self.world, accepted),
                         name="aphro-tp-accept", daemon=True).start()
        while len(w.conns) < self.world:
            conn = self._next_connection(accepted, deadline)
            _, rank, world, _, _ = recv(conn)
            if world != self.world or rank in w.conns or not 0 <= rank < world:
                conn.close()
                raise ConfigError(f"a worker joined as rank {rank} of {world}; this engine has "
                                  f"tensor_parallel_size={self.world}")
            w.conns[rank] = conn
        if not external:
            w.shm = ShmBroadcast.create(self.world, _slot_bytes(cfg))
        master = None if external else f"127.0.0.1:{free_port()}"
        for conn in w.conns.values():
            send(conn, ("init", cfg, w.shm.handle if w.shm else None, master))
        ready = self._gather(list(range(self.world)))
        self.load_report = ready[0]["load_report"]

    def _spawn(self, address: str, key_hex: str) -> None:
        env = dict(os.environ, WORLD_SIZE=str(self.world), **{
            ENV_ADDRESS: address, ENV_KEY: key_hex, ENV_PARENT: str(os.getpid())})
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        env.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast (shared hosts)
        env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        if self.config.device.type == "cpu":  # CPU ranks share the cores
            env["APHRO_TP_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.world))
        for rank in range(self.world):
            env.update(RANK=str(rank), LOCAL_RANK=str(rank))
            self._w.procs.append(subprocess.Popen([sys.executable, "-c", _WORKER_CODE], env=env))

    def _next_connection(self, accepted: queue.Queue, deadline: float) -> Connection:
        """The next worker's connection; a local worker that died starting is an error."""
        while True:
            for rank, proc in enumerate(self._w.procs):
                if proc.poll() is not None:
                    raise TPWorkerError(f"tensor-parallel worker rank {rank} (pid {proc.pid}) "
                                        f"exited with code {proc.returncode} while starting "
                                        "(see its output above)")
            if time.monotonic() > deadline:
                raise TPWorkerError(f"{self.world - len(self._w.conns)} tensor-parallel workers "
                                    "did not connect within "
                                    f"{self.config.parallel.distributed_timeout_s:.0f} s")
            try:
                return accepted.get(timeout=0.1)
            except queue.Empty:
                pass

    # -- messages ------------------------------------------------------------------------------
    def _check(self) -> None:
        if self.failure is not None:
            raise TPWorkerError(f"the tensor-parallel engine is closed: {self.failure}")
        if not self._w.conns:
            raise TPWorkerError("the tensor-parallel engine is closed")

    def _broadcast(self, msg: tuple) -> None:
        self._check()
        payload = pickle.dumps(msg, protocol=5)
        w = self._w
        if w.shm is not None and w.shm.write(payload, check=self._poll_failure):
            return
        for conn in w.conns.values():  # remote workers, or a message larger than a slot
            conn.send_bytes(payload)

    def _poll_failure(self) -> None:
        """While waiting for shared memory: a worker that reported or died ends the wait."""
        ready = wait(list(self._w.conns.values()), timeout=0)
        if ready:
            self._fail(ready)

    def _rank_of(self, conn: Connection) -> int:
        return next(r for r, c in self._w.conns.items() if c is conn)

    def _describe(self, rank: int, msg) -> tuple[bool, str]:
        """(died, text) for what a failing worker left: its error message, or its exit."""
        if msg is not None:
            kind, value = msg
            if kind == "error":
                return False, f"tensor-parallel worker rank {rank} failed:\n{value}"
            return False, f"tensor-parallel worker rank {rank} answered out of turn ({kind})"
        proc = self._proc(rank)
        code = None
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = proc.wait(timeout=2)
        pid = f" (pid {proc.pid})" if proc is not None else ""
        return True, (f"tensor-parallel worker rank {rank}{pid} exited"
                      + (f" with code {code}" if code is not None else "")
                      + " (see its output above)")

    def _fail(self, ready: list[Connection], first: tuple[int, object] | None = None) -> None:
        """Collect what every failing worker says (a moment's grace: one death makes the others
        fail too), close the executor and raise, the dead rank first: it is the cause."""
        found: dict[int, tuple[bool, str]] = {}
        if first is not None:
            found[first[0]] = self._describe(*first)
        deadline = time.monotonic() + 0.5
        while True:
            for conn in ready:
                rank = self._rank_of(conn)
                if rank in found:
                    continue
                try:
                    msg = recv(conn)
                except (EOFError, OSError):
                    msg = None
                found[rank] = self._describe(rank, msg)
            left = [c for r, c in self._w.conns.items() if r not in found]
            remaining = deadline - time.monotonic()
            if not left or remaining <= 0:
                break
            ready = wait(left, timeout=remaining)
            if not ready:
                break
        texts = [t for _, t in sorted(found.values(), key=lambda d: not d[0])]
        self.failure = texts[0].splitlines()[0]
        self._w.shutdown(graceful=False, timeout_s=0)
        raise TPWorkerError("\n".join(texts))

    def _proc(self, rank: int) -> subprocess.Popen | None:
        return self._w.procs[rank] if rank < len(self._w.procs) else None

    def _gather(self, ranks: list[int]) -> list[Any]:
        """One ("ok", value) from each of `ranks`, in rank order; any worker's error or exit
        meanwhile raises TPWorkerError (and closes the executor)."""
        self._check()
        want, got = set(ranks), {}
        conns = self._w.conns
        while want:
            ready = wait(list(conns.values()))
            for conn in ready:
                rank = self._rank_of(conn)
                if rank not in want:  # a worker that should be silent: it failed
                    self._fail(ready)
                try:
                    msg = recv(conn)
                except (EOFError, OSError):
                    self._fail(ready)
                if msg[0] != "ok":
                    self._fail([c for c in ready if c is not conn], (rank, msg))
                got[rank] = msg[1]
                want.discard(rank)
        return [got[r] for r in ranks]

    # -- the executor interface ------------------------------------------------------------------
    def launch(self, batch: StepBatch) -> _Reply:
        """Send a step; its RunnerOutput is rank 0's next answer (steps answer in order)."""
        self._broadcast(("step", batch))
        return _Reply(self)

    def collective_rpc(self, fn: str | Callable, *args) -> list[Any]:
        """fn(runner, *args), or runner.fn(*args) for a name, on every rank; results by rank.
        fn must pickle (a ModelRunner method name or a module-level function)."""
        self._broadcast(("call", fn, args))
        return self._gather(list(range(self.world)))

    def determine_num_blocks(self) -> int:
        """The smallest rank's KV block count (each rank holds its own KV heads)."""
        return min(self.collective_rpc("available_kv_blocks"))

    def init_kv_cache(self, num_blocks: int) -> None:
        self.collective_rpc("init_kv_cache", num_blocks)

    def observe(self, spec: ObserveSpec | None) -> None:
        self.collective_rpc("observe", spec)

    def take_observations(self) -> Observations:
        return self.collective_rpc("take_observations")[0]

    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._w.procs]

    def close(self) -> None:
        """Stop the workers and join them (killed after shutdown_timeout_s); idempotent."""
        if self._w.conns or self._w.procs:
            graceful = self.failure is None and bool(self._w.conns)
            self._w.shutdown(graceful, self.config.parallel.shutdown_timeout_s)
            self._w.procs = []
        self._finalizer.detach()
