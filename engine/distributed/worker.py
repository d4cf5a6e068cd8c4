"""A tensor-parallel worker process: one rank's ModelRunner, serving its driver.

Started by the driver's MultiprocExecutor on this machine (`python -c "from
engine.distributed.worker import main; main()"`), or by torchrun on several machines (`aphro
worker --connect HOST:PORT`, README). It connects to the driver, receives the EngineConfig,
joins the ranks' torch.distributed group (NCCL on CUDA, gloo on CPU), builds its runner, then
runs each message until told to stop:

    ("step", StepBatch)   run it; rank 0 answers with the RunnerOutput
    ("call", fn, args)    fn(runner, *args) or runner.fn(*args); every rank answers
    ("stop",)             free everything, leave the group, exit 0

Messages arrive through shared memory (engine.distributed.shm_broadcast) when the driver is on
this machine, else over the connection. Every answer is ("ok", value) or ("error", text): a
failure is reported with its traceback and the process exits 1. A worker whose driver is gone
exits by itself (a watchdog thread), so no worker outlives the process that started it.
"""

from __future__ import annotations

import datetime
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Client, Connection

# environment the driver (or the user, with torchrun) sets
ENV_ADDRESS = "APHRO_DRIVER_ADDRESS"  # "HOST:PORT", or a Unix socket path
ENV_KEY = "APHRO_WORKER_KEY"  # hex authentication key of the driver's listener
ENV_PARENT = "APHRO_PARENT_PID"  # local workers: exit when this process is gone
_WATCH_S = 0.5


def send(conn: Connection, obj) -> None:
    """Plain pickle over the connection: Connection.send's pickler would pass tensors as file
    descriptors of shared memory (torch registers that), which unrelated processes cannot take."""
    conn.send_bytes(pickle.dumps(obj, protocol=5))


def recv(conn: Connection):
    return pickle.loads(conn.recv_bytes())


def parse_address(text: str):
    """'HOST:PORT' -> (host, port); anything else is a Unix socket path."""
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit():
        return host or "127.0.0.1", int(port)
    return text


def _watch_parent(pid: int) -> None:
    def watch() -> None:
        while True:
            time.sleep(_WATCH_S)
            if os.getppid() != pid:
                os._exit(1)  # the driver is gone: nobody to serve

    threading.Thread(target=watch, name="aphro-parent-watch", daemon=True).start()


class _Inbox:
    """The driver's messages: from shared memory, or from the connection."""

    def __init__(self, conn: Connection, shm_handle, reader: int, check) -> None:
        from engine.distributed.shm_broadcast import ShmBroadcast

        self.conn, self.check = conn, check
        self.shm = ShmBroadcast.attach(shm_handle, reader) if shm_handle is not None else None

    def recv(self):
        data = self.shm.read(self.check) if self.shm is not None else None
        if data is None:
            data = self.conn.recv_bytes()
        return pickle.loads(data)


def main(address: str | None = None) -> None:
    env = os.environ
    address = address or env[ENV_ADDRESS]
    key = env.get(ENV_KEY)
    if not key:
        sys.exit(f"aphro worker: set {ENV_KEY} to the driver's key (the same on every machine)")
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank = int(env.get("LOCAL_RANK", rank))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver decides when workers stop
    if env.get(ENV_PARENT):
        _watch_parent(int(env[ENV_PARENT]))
    conn = _connect(parse_address(address), bytes.fromhex(key), float(env.get(
        "APHRO_CONNECT_TIMEOUT_S", "600")))
    send(conn, ("hello", rank, world, local_rank, os.getpid()))
    try:
        _serve(conn, rank, world, local_rank)
    except BaseException:  # noqa: BLE001 - any failure: report it, then leave
        text = traceback.format_exc()
        print(f"[aphro tensor-parallel rank {rank}] {text}", file=sys.stderr, flush=True)
        try:
            send(conn, ("error", text[-8000:]))
        except OSError:
            pass
        sys.stderr.flush()
        os._exit(1)  # a failed group cannot be torn down cleanly: leave without trying
    os._exit(0)


def _connect(address, key: bytes, timeout_s: float) -> Connection:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return Client(address, authkey=key)
        except (ConnectionRefusedError, FileNotFoundError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)  # the driver is not listening yet (workers started first)


def _serve(conn: Connection, rank: int, world: int, local_rank: int) -> None:
    import torch
    import torch.distributed as dist

    from engine.distributed.parallel_state import set_tensor_parallel
    from engine.runner.model_runner import ModelRunner

    kind, config, shm_handle, master = recv(conn)
    assert kind == "init", kind
    backend = "nccl" if config.device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    elif os.environ.get("APHRO_TP_THREADS"):
        torch.set_num_threads(int(os.environ["APHRO_TP_THREADS"]))
    timeout = datetime.timedelta(seconds=config.parallel.distributed_timeout_s)
    init = f"tcp://{master}" if master else "env://"
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world,
                            timeout=timeout)
    set_tensor_parallel(rank, world, dist.group.WORLD)
    runner = ModelRunner(config, rank, local_rank)
    send(conn, ("ok", {"load_report": runner.load_report, "pid": os.getpid()}))

    def driver_alive() -> None:
        if conn.closed:
            raise EOFError("the driver closed the connection")

    inbox = _Inbox(conn, shm_handle, rank, driver_alive)
    while True:
        msg = inbox.recv()
        kind = msg[0]
        if kind == "step":
            out = runner.execute(msg[1])
            if rank == 0:
                send(conn, ("ok", out))
        elif kind == "call":
            fn, args = msg[1], msg[2]
            send(conn, ("ok", fn(runner, *args) if callable(fn) else getattr(runner, fn)(*args)))
        elif kind == "stop":
            break
        else:
            raise RuntimeError(f"unknown message {kind!r}")
    runner.close()
    if backend == "nccl":
        torch.cuda.synchronize()
    dist.destroy_process_group()
    send(conn, ("ok", "stopped"))
