"""The threaded loader's ring of reused (pinned) uint8 batches, and when a slot may be rewritten."""

from __future__ import annotations

import weakref

import numpy as np
import torch


def _rounded_up(num_bytes: int) -> int:
    """To 1/8 of its power of two (<= 12.5% more): rect validation's batch shapes vary, and a slot
    then settles on one allocation instead of growing by every larger batch."""
    step = max(4096, 1 << max(0, num_bytes.bit_length() - 4))
    return -(-max(num_bytes, 1) // step) * step


class BatchRing:
    def __init__(self, num_slots: int, pin: bool):
        if num_slots < 2:
            raise ValueError(f"need >= 2 slots (one in use, one being filled), got {num_slots}")
        self.num_slots, self.pin = num_slots, pin
        self._memory: list[torch.Tensor | None] = [None] * num_slots  # flat uint8 per slot
        self._handed_out: list[weakref.ref | None] = [None] * num_slots
        self._events: list = [None] * num_slots
        self._released = -1  # batches 0.._released are let go by the consumer
        self.issued = 0  # batch numbers used so far (the next iteration goes on from here)
        self.allocations = 0  # slot memory allocated so far (flat in the steady state)

    def is_free(self, number: int) -> bool:
        """Rule 1 for batch `number`'s slot (its previous batch let go, or never used)."""
        return number - self.num_slots <= self._released

    def wait_device(self, number: int) -> None:
        """Rule 2: block until the device work recorded when the slot's batch was let go is done."""
        slot = number % self.num_slots
        event, self._events[slot] = self._events[slot], None
        if event is not None:
            event.synchronize()

    def images(self, number: int, num_images: int, height: int, width: int) -> np.ndarray:
        """The writable (num_images, height, width, 3) array batch `number` is made in; its slot
        must be free (`is_free`, `wait_device`). New memory where rule 3 says so or it is small."""
        slot = number % self.num_slots
        num_bytes = num_images * height * width * 3
        kept = self._handed_out[slot]
        memory = self._memory[slot]
        if (
            memory is None
            or memory.numel() < num_bytes
            or (kept is not None and kept() is not None)
        ):
            capacity = _rounded_up(num_bytes)
            memory = self._memory[slot] = torch.empty(
                capacity, dtype=torch.uint8, pin_memory=self.pin
            )
            self.allocations += 1
        self._handed_out[slot] = None
        return memory.numpy()[:num_bytes].reshape(num_images, height, width, 3)

    def hand_out(self, number: int, array: np.ndarray) -> torch.Tensor:
        """uint8 (N, 3, H, W) over batch `number`'s NHWC array: channels_last strides, no copy."""
        self._handed_out[number % self.num_slots] = weakref.ref(array)
        return torch.from_numpy(array).permute(0, 3, 1, 2)

    def release(self, number: int) -> None:
        """The consumer has let go of batch `number` (and of every batch before it)."""
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            event = torch.cuda.Event()
            event.record()  # on the current stream: after any copy queued from this batch
            self._events[number % self.num_slots] = event
        self._released = max(self._released, number)
