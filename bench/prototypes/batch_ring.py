"""A ring of preallocated uint8 NHWC batch buffers (pinned when asked) shared by worker threads
and one consumer (prototype for issue 10: the module that owns the batch buffer).

Batch k lives in slot k % len(ring). A worker `claim(k)`s the slot (waiting until the consumer
has let go of batch k - len(ring)), fills it, and `publish(k, ...)`es it; the consumer `take(k)`s
batches in order. A taken batch stays valid until the consumer takes the next one (FFCV's
contract too); a CUDA consumer would record an event after its non_blocking copy and release the
slot when that event completes instead.
"""
from __future__ import annotations

import threading

import torch


class BatchRing:
    def __init__(self, num_slots: int, batch_size: int, height: int, width: int, pin: bool = False):
        if num_slots < 2:
            raise ValueError(f"need >= 2 slots (one being read, one being filled), got {num_slots}")
        self.slots = [torch.empty((batch_size, height, width, 3), dtype=torch.uint8, pin_memory=pin)
                      for _ in range(num_slots)]
        self._lock = threading.Condition()
        self._next_free = num_slots  # batch k may be claimed once k < _next_free
        self._ready: dict[int, tuple] = {}
        self._closed = False

    def claim(self, batch: int) -> torch.Tensor | None:
        """The slot for `batch`, once free; None when the ring is closed."""
        with self._lock:
            self._lock.wait_for(lambda: self._closed or batch < self._next_free)
            return None if self._closed else self.slots[batch % len(self.slots)]

    def publish(self, batch: int, count: int, labels, error: BaseException | None = None) -> None:
        with self._lock:
            self._ready[batch] = (count, labels, error)
            self._lock.notify_all()

    def take(self, batch: int) -> tuple[torch.Tensor, object]:
        """(images NHWC, labels) of `batch`, in order; frees the slot of batch - 1."""
        with self._lock:
            if batch > 0:
                self._next_free = batch + len(self.slots)  # batch - 1 let go: its slot is free
                self._lock.notify_all()
            self._lock.wait_for(lambda: self._closed or batch in self._ready)
            if self._closed:
                raise RuntimeError("ring closed")
            count, labels, error = self._ready.pop(batch)
        if error is not None:
            raise error
        return self.slots[batch % len(self.slots)][:count], labels

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
