"""A train batch's per-image work for the prefetcher (train.data.prefetch), drawn in the workers:
ColorJitter on the uint8 batch once it is on the device, random erasing on the normalised one.
(docs/DESIGN.md, "Issue 18")"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class DeviceOps:
    """Travels with its batch as the loader's third element; pure data (pickled from worker
    processes, a few hundred bytes)."""

    jitter_factors: np.ndarray | None = None  # (N, 3) brightness, contrast, saturation
    jitter_orders: np.ndarray | None = None  # (N,) indices into train.data.color.ORDERS
    erase_boxes: np.ndarray | None = None  # (N, 4) top, left, height, width; height 0: none

    def pin_memory(self, device=None) -> DeviceOps:
        return self  # DataLoader's pin_memory passes it through as it is

    def on_uint8(self, images) -> None:
        """ColorJitter, in place, on the uint8 NCHW batch (any device)."""
        if self.jitter_factors is not None:
            from train.data.color import color_jitter_

            color_jitter_(images, self.jitter_factors, self.jitter_orders)

    def on_float(self, x):
        """Random erasing, in place, on the normalised batch; returns x."""
        if self.erase_boxes is None:
            return x
        import torch

        from train.data.erasing import erase

        return erase(x, torch.from_numpy(self.erase_boxes))
