"""One writer, N readers: a ring of message slots in shared memory (the tensor-parallel driver
broadcasting each step's batch to the workers of this machine).

Layout: per slot a sequence number (the message it holds, +1; 0 = never written), a byte length
(-1: the message did not fit and travels beside, over each reader's connection) and one "read"
flag per reader; then the slots' data. The writer fills slot k % n once every reader has flagged
what it held, then publishes k + 1; reader r waits for k + 1 in its slot, copies the bytes out
and sets its flag. Publication relies on stores becoming visible in program order (x86-64's
total store order; the GPU servers this runs on).

Waiting spins briefly, then sleeps with a growing back-off, and calls `check()` every few
milliseconds, so a waiter notices a dead peer instead of hanging.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory

import numpy as np

_ALIGN = 64


@dataclass(frozen=True)
class ShmHandle:
    """What a reader needs to attach (picklable)."""

    name: str
    num_readers: int
    slot_bytes: int
    num_slots: int


class _Backoff:
    """Spin, then sleep 20 us, growing to 10 ms after a second of waiting; check() every 5 ms."""

    def __init__(self, check: Callable[[], None] | None) -> None:
        self.check, self.spins = check, 0
        self.start = self.last_check = time.monotonic()

    def wait(self) -> None:
        self.spins += 1
        if self.spins < 200:
            time.sleep(0)
            return
        now = time.monotonic()
        waited = now - self.start
        time.sleep(2e-5 if waited < 0.01 else 1e-3 if waited < 1.0 else 1e-2)
        if self.check is not None and now - self.last_check > 0.005:
            self.last_check = now
            self.check()


class ShmBroadcast:
    def __init__(self, handle: ShmHandle, create: bool, reader: int | None = None) -> None:
        self.handle, self.reader = handle, reader
        n, r = handle.num_slots, handle.num_readers
        header = _round(8 * n) + _round(8 * n) + _round(n * r)
        size = header + n * handle.slot_bytes
        if create:
            self.shm = shared_memory.SharedMemory(create=True, size=size)
            self.handle = handle = ShmHandle(self.shm.name, r, handle.slot_bytes, n)
        else:
            # the writer owns the segment and unlinks it: readers must not (Python < 3.13
            # registers every attach with a resource tracker that unlinks at exit)
            try:
                self.shm = shared_memory.SharedMemory(name=handle.name, track=False)
            except TypeError:
                self.shm = shared_memory.SharedMemory(name=handle.name)
                resource_tracker.unregister(self.shm._name, "shared_memory")
        buf = self.shm.buf
        self._seqs = np.ndarray((n,), np.int64, buf, 0)
        self._lens = np.ndarray((n,), np.int64, buf, _round(8 * n))
        self._flags = np.ndarray((n, r), np.uint8, buf, 2 * _round(8 * n))
        self._data = np.ndarray((n, handle.slot_bytes), np.uint8, buf, header)
        if create:
            self._seqs[:] = 0
            self._flags[:] = 1
        self._next = 0  # the next message number this side writes or reads

    @classmethod
    def create(cls, num_readers: int, slot_bytes: int, num_slots: int = 4) -> ShmBroadcast:
        return cls(ShmHandle("", num_readers, slot_bytes, num_slots), create=True)

    @classmethod
    def attach(cls, handle: ShmHandle, reader: int) -> ShmBroadcast:
        return cls(handle, create=False, reader=reader)

    def write(self, payload: bytes, check: Callable[[], None] | None = None) -> bool:
        """Publish `payload` to every reader; False when it is larger than a slot (the slot then
        tells readers to take it from their connection)."""
        slot = self._next % self.handle.num_slots
        backoff = _Backoff(check)
        while not self._flags[slot].all():
            backoff.wait()
        fits = len(payload) <= self.handle.slot_bytes
        self._flags[slot] = 0
        if fits:
            self._data[slot, :len(payload)] = np.frombuffer(payload, np.uint8)
        self._lens[slot] = len(payload) if fits else -1
        self._next += 1
        self._seqs[slot] = self._next  # publish last
        return fits

    def read(self, check: Callable[[], None] | None = None) -> bytes | None:
        """The next message, or None when it came beside (on the reader's connection)."""
        slot = self._next % self.handle.num_slots
        self._next += 1
        backoff = _Backoff(check)
        while self._seqs[slot] != self._next:
            backoff.wait()
        n = int(self._lens[slot])
        data = None if n < 0 else self._data[slot, :n].tobytes()
        self._flags[slot, self.reader] = 1
        return data

    def close(self, unlink: bool = False) -> None:
        # drop the numpy views before the buffer can be released
        self._seqs = self._lens = self._flags = self._data = None
        try:
            self.shm.close()
        except BufferError:  # a view still exported somewhere: the mapping goes at exit
            pass
        if unlink:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass


def _round(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN
